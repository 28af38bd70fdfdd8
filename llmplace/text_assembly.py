"""Tokens → text, in one place: every generation loop (plain, speculative, with logits hooks, and the engine's
sequences) turns its tokens into text through one `TextAssembler` per sequence.

Text is assembled incrementally: each token's bytes go through an incremental UTF-8 decoder, so a character
split across tokens is emitted whole, once, and the reply is never re-detokenized. Stop strings are matched
across token boundaries; text that might be the start of a stop string is held back until it is known not to
be.

This is the per-token hot path (DESIGN §10: a few tens of microseconds of Python per token at most): one
cached vocabulary look-up per token, the incremental decoder only while a character is split, the stop matcher
only when the text holds a character that begins a stop string (or text is held back).
"""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING, Sequence

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from .vocab import Vocab


def stop_strings(stop: object) -> list[str]:
    """A request's `stop` as a list: a str, a sequence of str, or None (no stop strings); else
    InvalidParameterError (bytes or ints used to fail deep in the matcher with a TypeError)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, (bytes, bytearray)) or not isinstance(stops, (list, tuple)) or not all(
            isinstance(s, str) for s in stops):
        raise InvalidParameterError(f"stop must be a str, a list of str or None, not {stop!r}")
    return list(stops)


class StopMatcher:
    """Holds back text that could be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        # Finds a character that begins some stop string. Text without one, while nothing is held back, can
        # neither hold a stop string nor end with the start of one: it passes as it is.
        firsts = sorted({stop[0] for stop in self.stops})
        self.first_char = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]").search if firsts else None

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self.pending and (self.first_char is None or self.first_char(text) is None):
            return text, False
        pending = self.pending + text
        cut = -1
        for stop in self.stops:
            i = pending.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.pending = ""
            return pending[:cut], True
        # Hold back the longest end of `pending` that begins some stop string. Only a position holding a
        # stop's first character can start one, so most tokens cost one rfind per stop.
        n = len(pending)
        hold = 0
        for stop in self.stops:
            lo = n - min(len(stop) - 1, n)  # the earliest start: a held part is shorter than the stop
            if lo >= n - hold:
                continue
            first = stop[0]
            j = pending.find(first, lo)
            while 0 <= j < n - hold:
                if stop.startswith(pending[j:]):
                    hold = n - j
                    break
                j = pending.find(first, j + 1)
        if hold:
            self.pending = pending[n - hold:]
            return pending[:n - hold], False
        self.pending = ""
        return pending, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextAssembler:
    """One sequence's text: `add(token, at_limit)` returns the text the token adds and the finish reason it
    causes ("stop": an end-of-generation token or a stop string; "length": the last token allowed; None: go
    on). `end()` flushes what is held back when something else ends the sequence (a stopping criterion)."""

    __slots__ = ("_entry", "_decoder", "_decode", "_partial", "_matcher", "_feed", "_first_char")

    def __init__(self, vocab: Vocab, stops: Sequence[str] = ()) -> None:
        self._entry = vocab.generation_entry
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decode = self._decoder.decode
        self._partial = False  # the decoder holds the first bytes of a character
        self._matcher = StopMatcher(stops)
        self._feed = self._matcher.feed if self._matcher.stops else None
        self._first_char = self._matcher.first_char

    def add(self, token: int, at_limit: bool) -> tuple[str, str | None]:
        eog, data, text = self._entry(token)
        if eog:
            return self.end(), "stop"
        # A piece that is whole UTF-8 while no character is pending skips the incremental decoder (whose
        # result would be the same); with no stop strings the matcher is skipped.
        if self._partial or text is None:
            text = self._decode(data)
            self._partial = bool(self._decoder.getstate()[0])
        feed = self._feed
        # _first_char is None only without stop strings, when _feed is None too
        if feed is not None and (self._matcher.pending or self._first_char(text) is not None):  # type: ignore[misc]
            text, hit = feed(text)
            if hit:
                return text, "stop"
        if not at_limit:
            return text, None
        tail = self._decode(b"", final=True) if self._partial else ""
        self._partial = False
        if feed is not None:
            tail, hit = feed(tail)
            if hit:
                return text + tail, "stop"
            tail += self._matcher.flush()
        return text + tail, "length"

    def end(self) -> str:
        """The text still held (a split character's replacement, a stop string's possible start)."""
        text = self._decode(b"", final=True) if self._partial else ""
        self._partial = False
        return text + self._matcher.flush()
