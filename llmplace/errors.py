"""The exceptions llmplace raises, and `check`, the one place C return codes become exceptions.

Every exception derives from `LlmplaceError` and also from the builtin a caller would naturally catch
(`ModelLoadError` is an `OSError`, a bad argument is a `ValueError` ...), so code written against
llama-cpp-python's builtins keeps working. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


class LlmplaceError(Exception):
    """Base class of every error raised by llmplace."""


class BuildError(LlmplaceError, ImportError):
    """The compiled part of llmplace is missing, incomplete or from another build."""


class ModelLoadError(LlmplaceError, OSError):
    """A model file could not be read or loaded."""


class ClosedError(LlmplaceError, RuntimeError):
    """An object was used after `close()`."""


class InvalidParameterError(LlmplaceError, ValueError):
    """A parameter value is out of range or of the wrong kind."""


class UnknownKeywordError(InvalidParameterError, TypeError):
    """A keyword the call does not take: also a TypeError, which Python itself raises for one."""


def unknown_keyword_error(call: str, unknown: Iterable[str], known: Iterable[str]) -> UnknownKeywordError:
    """The error for keywords `call` does not take, naming the close known name for each typo (`max_token` ->
    `max_tokens`), so the message points at the fix rather than at an internal class."""
    import difflib

    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return UnknownKeywordError(f"{call} got unknown keyword argument(s) {', '.join(parts)}; it takes "
                               f"{', '.join(sorted(known))}")


class PlacementError(LlmplaceError, ValueError):
    """A placement rule, split or device selection cannot be applied."""


class DeviceNotFoundError(LlmplaceError, LookupError):
    """A named device or buffer type does not exist on this machine."""


class OutOfMemoryError(LlmplaceError, MemoryError):
    """A device does not have the memory the requested model, context or batch needs."""


class ContextOverflowError(LlmplaceError, ValueError):
    """More tokens than the context window holds."""


class TokenizationError(LlmplaceError, ValueError):
    """Text could not be turned into tokens, or tokens into text."""


class TemplateError(InvalidParameterError):
    """A chat template is not valid Jinja, or refused the messages it was given (its raise_exception)."""


class IncompatibleDraftError(LlmplaceError, ValueError):
    """A draft model's vocabulary differs from the target's, so its tokens cannot be verified by the target."""


class DecodeError(LlmplaceError, RuntimeError):
    """llama_decode failed."""


class BusyError(LlmplaceError, RuntimeError):
    """A Context (or a Llama, Chat) is in use by another thread."""


class AbortedError(LlmplaceError, RuntimeError):
    """A callback asked llama.cpp to stop (a progress callback returned False, or an abort was requested)."""


class ImageError(LlmplaceError, ValueError):
    """An image could not be used (llmplace.images): the base of the three errors below."""


class MalformedImageError(ImageError):
    """The image's bytes are not a readable image of the format they claim (truncated, corrupt, empty, too large)."""


class UnsupportedImageFormatError(ImageError):
    """The image is in a format libmtmd cannot decode (it reads PNG, JPEG, GIF, BMP, TGA, PSD, HDR, PIC, PNM)."""


class NoProjectorError(ImageError):
    """An image was given to a model with no projector (mmproj) loaded to turn images into its embeddings."""


# llama_decode's documented return codes (llama.h).
_DECODE_ERRORS = {
    1: (OutOfMemoryError, "no KV-cache slot for the batch: the context is full or fragmented; "
                          "clear or shorten the context, or create it with a larger n_ctx"),
    2: (AbortedError, "decoding was aborted by the abort callback; the context keeps the tokens decoded so far"),
    -1: (InvalidParameterError, "the batch is invalid (empty, or a token id outside the vocabulary)"),
}


def check(rc: int, op: str) -> int:
    """Turn a llama.cpp return code into an exception; return rc when it means success (rc == 0).

    `op` names the C call, so messages say where the failure came from.
    """
    if rc == 0:
        return rc
    error, message = _DECODE_ERRORS.get(
        rc, (DecodeError, "the compute graph failed (see the llmplace log for llama.cpp's reason)"))
    raise error(f"{op} failed (code {rc}): {message}")
