"""Route llama.cpp's and ggml's log to Python's `logging` (logger "llmplace").

llama.cpp logs every loaded tensor and much else to stderr by default; llmplace installs its callback
before the first backend is loaded, so nothing reaches stderr unless the logger lets it through.
The level comes from the environment variable LLMPLACE_LOG (DEBUG, INFO, WARNING, ERROR; default WARNING).
"""

from __future__ import annotations

import logging
import os
import threading

from ._ffi import C, ffi

logger = logging.getLogger("llmplace")
_native_logger = logging.getLogger("llmplace.native")

# ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous message).
_LEVELS = {
    C.GGML_LOG_LEVEL_NONE: logging.INFO,
    C.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    C.GGML_LOG_LEVEL_INFO: logging.INFO,
    C.GGML_LOG_LEVEL_WARN: logging.WARNING,
    C.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}

# llama.cpp's advice names its command-line flags; llmplace users set the same thing with a keyword
_FLAGS_AS_KEYWORDS = (
    ("consider using --load-mode none", "consider loading with use_mmap=False"),
    ("Try using a bigger --parallel value", "create the Context with a larger n_seq_max"),
)

_installed = False


class _ThreadLog(threading.local):
    """What the log callback keeps per thread. llama.cpp's callback is process-wide, but llama.cpp and ggml call
    it on the thread doing the work (llama_log_internal and ggml_log_internal call it directly; the loader's
    worker threads print with fprintf, not through it). So a line belongs to the thread it arrives on: two
    threads loading or creating contexts at once neither mix their half-written lines nor quote each other's
    messages in their exceptions."""

    def __init__(self) -> None:
        self.pending: list[str] = []       # pieces of a line not yet ended by "\n"
        self.level = logging.INFO          # the level of the line in progress (GGML_LOG_LEVEL_CONT continues it)
        # Warning and error lines of this thread's native call in progress, kept whatever the logger's level,
        # so that an exception raised after a failed C call can quote llama.cpp's own reason (see `capture`).
        self.captured: list[str] | None = None


_thread = _ThreadLog()


def configure_from_environment() -> None:
    level = os.environ.get("LLMPLACE_LOG", "").strip().upper()
    if level:
        logger.setLevel(getattr(logging, level, logging.WARNING))
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


@ffi.def_extern()
def _llmplace_log_callback(level, text, user_data):  # noqa: ARG001 - signature fixed by ggml
    """Called by llama.cpp for every log fragment, on the thread that logs; must never raise into C."""
    try:
        state = _thread
        if level != C.GGML_LOG_LEVEL_CONT:
            state.level = _LEVELS.get(level, logging.INFO)
        wanted = _native_logger.isEnabledFor(state.level)
        captured = state.captured if state.level >= logging.WARNING else None
        if not wanted and captured is None:
            state.pending.clear()
            return
        piece = ffi.string(text).decode("utf-8", errors="replace")
        if not piece.endswith("\n"):
            state.pending.append(piece)
            return
        line = "".join(state.pending) + piece[:-1]
        state.pending.clear()
        if "-" in line:
            for flag, keyword in _FLAGS_AS_KEYWORDS:
                line = line.replace(flag, keyword)
        if captured is not None:
            captured.append(line.strip())
        if wanted:
            _native_logger.log(state.level, "%s", line)
    except Exception:  # noqa: BLE001 - a logging failure must not cross into C
        pass


class capture:
    """Collect llama.cpp's warning and error lines that this thread's native calls log meanwhile:
    `with capture() as lines: ...`. Per thread (see `_ThreadLog`): another thread's lines never land here. A
    capture nested in another one takes the lines while it is open."""

    def __enter__(self) -> list[str]:
        self._previous = _thread.captured
        _thread.captured = []
        return _thread.captured

    def __exit__(self, *exc_info) -> None:
        _thread.captured = self._previous


def install() -> None:
    """Install the callback (idempotent). Called before any backend is loaded."""
    global _installed
    if _installed:
        return
    configure_from_environment()
    C.llama_log_set(C._llmplace_log_callback, ffi.NULL)
    # libmtmd (images) keeps a logger of its own, which prints to stderr until told otherwise; this sets both its
    # helper's and its core's
    C.mtmd_helper_log_set(C._llmplace_log_callback, ffi.NULL)
    _installed = True
