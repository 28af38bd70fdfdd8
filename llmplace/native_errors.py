"""The one failure path of a llama.cpp call that reports failure by NULL or an error code.

llama.cpp says why a load, a context or a grammar failed only in its log; the C call returns NULL (or a code).
`native_call` runs the call under this thread's log capture (llmplace.logs), tests the result and raises the
typed exception the caller chose, quoting llama.cpp's own lines:

    handle = native_call(C.llama_adapter_lora_init, model_ptr, path,
                         error=lambda reason: ModelLoadError(f"could not load the LoRA adapter {path}: {reason}"))

`error` gets the joined reason, so a caller can pick the exception class from it (context creation tells a
refused combination of parameters from a failed allocation), or raise something it caught meanwhile (the
progress callback's exception during a model load).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from . import logs
from ._ffi import ffi

T = TypeVar("T")

# What a message says when llama.cpp logged nothing (a failure in a path without a log line).
NO_REASON = "no reason given"


def is_null(result) -> bool:
    """Failure test of the calls that return a pointer."""
    return result == ffi.NULL


def is_nonzero(result) -> bool:
    """Failure test of the calls that return a status code (0: success)."""
    return result != 0


def reason(messages: Sequence[str]) -> str:
    """llama.cpp's warning and error lines joined into one clause (NO_REASON when it logged none)."""
    return "; ".join(m for m in messages if m) or NO_REASON


def native_call(function: Callable[..., T], *args, error: Callable[[str], BaseException],
                failed: Callable[[T], bool] = is_null) -> T:
    """`function(*args)` with llama.cpp's log captured for this thread; when `failed(result)`, raise `error(reason)`,
    where reason is what llama.cpp logged meanwhile (warnings and errors), else return the result.

    Other threads' native calls log into their own capture, so the reason is this call's only."""
    with logs.capture() as messages:
        result = function(*args)
    if failed(result):
        raise error(reason(messages))
    return result
