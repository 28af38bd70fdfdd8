"""Errors and warnings of the llama-cpp-python compatibility layer."""

from __future__ import annotations

from ..errors import LlmplaceError


class UnsupportedFeatureError(LlmplaceError, NotImplementedError):
    """A llama-cpp-python feature llmplace.Llama does not implement yet (grammar, mirostat, LlamaCache ...).

    A NotImplementedError, so code can fall back: `except NotImplementedError`."""


class CompatibilityWarning(UserWarning):
    """An option llama-cpp-python accepts that llmplace.Llama accepts but does not apply (yet).

    Silence with `warnings.filterwarnings("ignore", category=CompatibilityWarning)`."""
