"""Who may use a Context now: one generation at a time, and calls from the thread running it.

llama.cpp contexts are not thread-safe, and a generation keeps state in the context between its steps (the
cached tokens, the last logits). So:
- a generation *holds* the context from the call that starts it until it ends, is closed, or is garbage
  collected, in whichever thread that happens (`GenerationHold`). A second generation, in any thread, raises
  BusyError at once, before it changes anything (two interleaved streams on one context used to produce
  wrong text with no error);
- a method call (`Context.decode`, `clear` ...) runs only when no other thread is in one and no generation is
  held by another thread; the thread running (or that last ran) the held generation may call methods, since a
  generation's own steps decode and truncate through them.

A plain Lock and tokens, never an RLock: an RLock can only be released by the thread that took it, and a
suspended stream collected in another thread left the context locked forever.
"""

from __future__ import annotations

import threading
import weakref
from typing import Generator

from .errors import AbortedError, BusyError, ClosedError

_get_ident = threading.get_ident

BUSY_MESSAGE = ("this Context is in use by another thread (llama.cpp contexts are not thread-safe): give each "
                "thread its own Context (one Model serves several), or serialize the calls with a lock")
GENERATING_MESSAGE = ("a generation on this Context is still in progress (a stream that was neither exhausted "
                      "nor closed): finish iterating it or call its close() before starting another, or give "
                      "each generation its own Context")
CLOSED_DURING_MESSAGE = ("the Context was closed (close() on it, its Model, Chat or Llama, from another thread) "
                         "while this generation ran; the generation cannot go on")


class ContextLock:
    """The holder of one context: the generation holding it (a token) and the thread in a method call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: object | None = None       # the token of the generation holding the context
        self.holder_thread: int | None = None   # the thread running (or that last ran) that generation
        self._caller: int | None = None         # the thread inside a method call, and its nesting depth
        self._depth = 0

    def enter_call(self) -> None:
        me = _get_ident()
        with self._lock:
            if self._caller == me:
                self._depth += 1
                return
            if self._caller is not None or (self.holder is not None and self.holder_thread != me):
                raise BusyError(BUSY_MESSAGE)
            self._caller, self._depth = me, 1

    def exit_call(self) -> None:
        with self._lock:
            self._depth -= 1
            if not self._depth:
                self._caller = None

    def hold(self) -> object:
        """A token for a new generation, or BusyError when another generation or thread is using the context."""
        me = _get_ident()
        with self._lock:
            if self.holder is not None:
                raise BusyError(BUSY_MESSAGE if self.holder_thread != me else GENERATING_MESSAGE)
            if self._caller is not None and self._caller != me:
                raise BusyError(BUSY_MESSAGE)
            token = self.holder = object()
            self.holder_thread = me
            return token

    def resume(self) -> None:
        """The held generation takes a step in this thread (which may differ from the last step's)."""
        me = _get_ident()
        with self._lock:
            if self._caller is not None and self._caller != me:
                raise BusyError(BUSY_MESSAGE)
            self.holder_thread = me

    def drop(self, token: object) -> None:
        """Give the context back (from any thread); a token already given back changes nothing."""
        with self._lock:
            if self.holder is token:
                self.holder = self.holder_thread = None


class GenerationHold:
    """The right to generate on `context`: taken when created (BusyError if another generation or thread has
    it), given back by `release()`, or when this object is garbage collected (a stream that was created and
    dropped, even never started, even in another thread)."""

    def __init__(self, context) -> None:
        self.context = context
        lifetime = context._lifetime
        # closed with a stream still suspended: say closed, not busy (finishing the stream would not help)
        with lifetime:
            pass
        lock = context._claim
        self.release = weakref.finalize(self, lock.drop, lock.hold())

    def steps(self, steps: Generator, release: bool = True) -> Generator:
        """Run `steps` (a generator working on the context; values sent in are passed on) one step at a time
        inside a use of the context, so that close() from another thread waits for the step in flight (and
        aborts its decode) instead of freeing memory under it; between steps nothing is held, so close() never
        waits for a suspended stream, whose next step raises ClosedError instead. release: give the context
        back when the steps end (False: the caller releases, after its own clean-up)."""
        context = self.context
        lifetime, lock = context._lifetime, context._claim
        value = None
        try:
            while True:
                lock.resume()
                lifetime.__enter__()
                try:
                    step = steps.send(value)
                except StopIteration:
                    return
                except AbortedError:
                    if lifetime.closing:
                        raise ClosedError(CLOSED_DURING_MESSAGE) from None
                    raise
                finally:
                    lifetime.__exit__()
                value = yield step
        finally:
            try:
                steps.close()  # its own clean-up (e.g. truncating a speculative draft) while the context is held
            except ClosedError:
                pass  # the context was closed meanwhile: nothing left to clean
            if release:
                self.release()
