"""Load progress: the C callback, user callbacks that may cancel, and the default terminal bar."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from ._ffi import ffi

ProgressCallback = Callable[[float], Optional[bool]]


class TerminalProgressBar:
    """A one-line bar on stderr, shown only once a load has taken longer than `delay` seconds, so quick
    loads print nothing. Used by default when stderr is a terminal."""

    def __init__(self, label: str = "loading", delay: float = 1.0, width: int = 30, stream=None) -> None:
        self.label, self.delay, self.width = label, delay, width
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, fraction: float) -> bool:
        elapsed = time.monotonic() - self.start
        if elapsed >= self.delay or (self.shown and fraction >= 1.0):
            self.shown = True
            filled = int(self.width * min(max(fraction, 0.0), 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if fraction >= 1.0 else ""
            self.stream.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}% {elapsed:5.1f}s{end}")
            self.stream.flush()
        return True


class ProgressRelay:
    """Carries a Python progress callback through C. The C callback catches everything, stores the
    exception and returns "abort"; the caller re-raises it after the C call returns."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.exception: BaseException | None = None
        self.cancelled = False
        self.handle = ffi.new_handle(self)

    def report(self, fraction: float) -> bool:
        if self.callback is None:
            return True
        try:
            keep_going = self.callback(fraction)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller after the C call
            self.exception = exc
            return False
        if keep_going is False:
            self.cancelled = True
            return False
        return True


@ffi.def_extern()
def _llmplace_progress_callback(progress, user_data):
    try:
        return ffi.from_handle(user_data).report(float(progress))
    except BaseException:  # noqa: BLE001 - nothing may unwind into C
        return False


def resolve(progress: bool | ProgressCallback | None, label: str) -> ProgressCallback | None:
    """None → a terminal bar if stderr is a terminal; True → always the bar; False → nothing."""
    if progress is None:
        return TerminalProgressBar(label) if sys.stderr.isatty() else None
    if progress is True:
        return TerminalProgressBar(label)
    if progress is False:
        return None
    if not callable(progress):
        from .errors import InvalidParameterError
        raise InvalidParameterError(
            f"progress must be True, False, None or a callable taking a fraction, not {type(progress).__name__}")
    return progress
