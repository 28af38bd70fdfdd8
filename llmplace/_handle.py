"""The lifetime every wrapper of a native llama.cpp object shares: own one handle, free it once, and never while
a call on it is in flight in another thread.

Each native call runs inside `with obj._lifetime:` (a `Lifetime`), which counts the calls in flight. `close()`
first refuses new calls (they raise ClosedError), then lets the object interrupt what it can (a Context sets its
abort flag, so a decode stops at its next graph node), then waits until the calls in flight have returned, and
only then frees the handle. Without this, a close() from another thread freed the memory under a running
llama_decode (SIGSEGV, issue 17 §5).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

from ._ffi import ffi
from .errors import BusyError, ClosedError

_get_ident = threading.get_ident


class Lifetime:
    """Counts the native calls in flight on one object; `close` refuses new ones and waits for those in flight.

    Used as `with lifetime:` around a call (nested uses by one thread count twice). A lock and a list, no
    generator: generation enters one per token."""

    __slots__ = ("_lock", "_idle", "_users", "closing", "_message")

    def __init__(self, closed_message: str) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._users: list[int] = []   # the thread of each call in flight (a thread nesting calls appears twice)
        self.closing = False          # set by close: every new call raises ClosedError
        self._message = closed_message

    def __enter__(self) -> None:
        ident = _get_ident()
        with self._lock:
            if self.closing:
                raise ClosedError(self._message)
            self._users.append(ident)

    def __exit__(self, *exc_info) -> None:
        ident = _get_ident()
        with self._lock:
            self._users.remove(ident)
            if not self._users:
                self._idle.notify_all()

    def used_by_this_thread(self) -> bool:
        return _get_ident() in self._users

    def refuse_inside(self, what: str) -> None:
        """BusyError when the calling thread is itself inside a call on the object (a callback, such as a logits
        processor, closing the object it is called from): waiting for that call would wait forever."""
        if self.used_by_this_thread():
            raise BusyError(f"{what} cannot be closed from inside a call on it (a callback of its own generation, "
                            "such as a logits processor or stopping criterion): close it after the call returns, "
                            "or call abort() to stop the generation")

    def close(self, interrupt: Callable[[], None] | None = None, timeout: float | None = None) -> bool:
        """Refuse new calls, run `interrupt` (ask the calls in flight to stop early), wait until none is left
        (at most `timeout` seconds: then False)."""
        with self._lock:
            self.closing = True
        if interrupt is not None:
            interrupt()
        with self._lock:
            return self._idle.wait_for(lambda: not self._users, timeout)


# How long interpreter exit waits for a call in flight in a daemon thread before leaving the handle to the OS.
EXIT_WAIT_SECONDS = 10.0


def _free_when_idle(lifetime: Lifetime, interrupt, free: Callable, handle, *free_args) -> None:
    """The finalizer of a native object: free it once no call is in flight. After close() or garbage
    collection none is; at interpreter exit a daemon thread may still be decoding on it (freeing the memory
    under it crashed the exit): it is interrupted and waited for, and if it does not return in time the handle
    is left to the operating system."""
    if lifetime.close(interrupt, EXIT_WAIT_SECONDS):
        free(handle, *free_args)


class NativeObject:
    """Owns one native handle. `close()` (or leaving a `with` block, or garbage collection, or interpreter
    exit) frees it exactly once; using the object afterwards raises ClosedError with `_closed_message`.

    Subclasses run their native calls inside `with self._lifetime:`; close() waits for those in flight (after
    `_interrupt_calls()`, which may ask them to stop early) and `_close_dependents()` (objects that must be
    freed first, e.g. a model's contexts) before freeing the handle."""

    _handle = ffi.NULL
    _closed_message = "this object is closed"

    def _own(self, handle, free: Callable, *free_args, interrupt: Callable[[], None] | None = None) -> None:
        """Take ownership of `handle`; `free(handle, *free_args)` releases it. interrupt: what asks calls in
        flight to return early at interpreter exit (it must not refer to this object)."""
        self._lifetime = Lifetime(self._closed_message)
        self._close_lock = threading.Lock()  # a second close() waits for the first to have freed the handle
        self._handle = handle
        self._finalizer = weakref.finalize(self, _free_when_idle, self._lifetime, interrupt, free, handle, *free_args)

    @property
    def _ptr(self):
        if self._handle == ffi.NULL:
            raise ClosedError(self._closed_message)
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle == ffi.NULL

    def _interrupt_calls(self) -> None:
        """Ask native calls in flight (in other threads) to return early; by default they are waited for."""

    def _close_dependents(self) -> None:
        """Close what must be freed before this object (called once no call on it is in flight)."""

    def close(self) -> None:
        """Free the native object, once the calls in flight on it (in other threads) have returned; later calls
        raise ClosedError. Safe to call more than once, and from any thread."""
        if self._handle == ffi.NULL:
            return
        with self._close_lock:
            if self._handle == ffi.NULL:
                return
            self._lifetime.refuse_inside(type(self).__name__)
            self._lifetime.close(self._interrupt_calls)
            self._close_dependents()
            self._finalizer()
            self._handle = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
