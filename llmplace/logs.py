"""Route llama.cpp's and ggml's log to Python's `logging` (logger "llmplace").

llama.cpp logs every loaded tensor and much else to stderr by default; llmplace installs its callback
before the first backend is loaded, so nothing reaches stderr unless the logger lets it through.
The level comes from the environment variable LLMPLACE_LOG (DEBUG, INFO, WARNING, ERROR; default WARNING).
"""

from __future__ import annotations

import logging
import os

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

_pending: list[str] = []          # pieces of a line not yet ended by "\n"
_pending_level = logging.INFO
_installed = False
# Warning and error lines of the native call in progress, kept whatever the logger's level, so that an
# exception raised after a failed C call can quote llama.cpp's own reason (see `capture`).
_captured: list[str] | None = None


def configure_from_environment() -> None:
    level = os.environ.get("LLMPLACE_LOG", "").strip().upper()
    if level:
        logger.setLevel(getattr(logging, level, logging.WARNING))
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


@ffi.def_extern()
def _llmplace_log_callback(level, text, user_data):  # noqa: ARG001 - signature fixed by ggml
    """Called by llama.cpp for every log fragment; must never raise into C."""
    global _pending_level
    try:
        if level != C.GGML_LOG_LEVEL_CONT:
            _pending_level = _LEVELS.get(level, logging.INFO)
        wanted = _native_logger.isEnabledFor(_pending_level)
        capturing = _captured is not None and _pending_level >= logging.WARNING
        if not (wanted or capturing):
            _pending.clear()
            return
        piece = ffi.string(text).decode("utf-8", errors="replace")
        if not piece.endswith("\n"):
            _pending.append(piece)
            return
        line = "".join(_pending) + piece[:-1]
        _pending.clear()
        if "-" in line:
            for flag, keyword in _FLAGS_AS_KEYWORDS:
                line = line.replace(flag, keyword)
        if capturing:
            _captured.append(line.strip())
        if wanted:
            _native_logger.log(_pending_level, "%s", line)
    except Exception:  # noqa: BLE001 - a logging failure must not cross into C
        pass


class capture:
    """Collect llama.cpp's warning and error lines during a native call: `with capture() as lines: ...`.

    Not re-entrant across threads; llmplace uses it around model loads, which hold the load lock."""

    def __enter__(self) -> list[str]:
        global _captured
        self._previous = _captured
        _captured = []
        return _captured

    def __exit__(self, *exc_info) -> None:
        global _captured
        _captured = self._previous


def install() -> None:
    """Install the callback (idempotent). Called before any backend is loaded."""
    global _installed
    if _installed:
        return
    configure_from_environment()
    C.llama_log_set(C._llmplace_log_callback, ffi.NULL)
    _installed = True
