"""llama-cpp-python's `llama_cpp.llama_speculative`, backed by llmplace's speculative decoding.

`Llama(..., draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))` works as in llama-cpp-python, but
runs llmplace's prompt-lookup drafter (n-grams of 4, 3 and 2 tokens; max_ngram_size is accepted and not
used). `LlamaDraftModelFile(path_or_model)` drafts with a small model of the same vocabulary, which
llama-cpp-python cannot do. Greedy output equals plain decoding's; sampled output keeps its distribution.
A LlamaDraftModel subclass of your own (a Python __call__ proposing tokens) is not run: llmplace warns and
decodes without speculation.
"""

from __future__ import annotations

import abc
import numbers
import os
from typing import Any

import numpy as np

from ..errors import InvalidParameterError
from ..speculative.checks import MAX_DEPTH


class LlamaDraftModel(abc.ABC):
    """Base class of llama-cpp-python's draft models: `__call__(input_ids) -> proposed token ids`."""

    @abc.abstractmethod
    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError()


def draft_depth(num_pred_tokens: Any) -> int:
    """num_pred_tokens as llmplace's draft depth. It is a most, so values beyond what llmplace drafts per step
    (speculative.checks.MAX_DEPTH) are capped and values below 1 raised to 1, as llama-cpp-python's lookup reads
    any int; only a value that is no int is an error."""
    if isinstance(num_pred_tokens, bool) or not isinstance(num_pred_tokens, numbers.Integral):
        raise InvalidParameterError(f"num_pred_tokens must be an int (the most tokens drafted per step), not "
                                    f"{num_pred_tokens!r}")
    return min(max(1, int(num_pred_tokens)), MAX_DEPTH)


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt-lookup speculation: propose the tokens that followed an earlier occurrence of the last n-gram.
    num_pred_tokens: the most tokens drafted per step. Called directly, it proposes what llama-cpp-python's
    does (find_candidate_pred_tokens); as Llama's draft_model, llmplace's own drafter runs (module docstring)."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10) -> None:
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    @staticmethod
    def find_candidate_pred_tokens(input_ids: np.ndarray, max_ngram_size: int, num_pred_tokens: int) -> np.ndarray:
        """Up to num_pred_tokens tokens that followed the first earlier occurrence of the last n tokens of
        input_ids, trying n = max_ngram_size first (at most len - 1) and shorter n-grams after; an empty intc
        array when nothing matches. The tokens are a slice of input_ids (its dtype); a continuation may run
        into the n-gram itself and is cut at the end of input_ids."""
        for name, value in (("max_ngram_size", max_ngram_size), ("num_pred_tokens", num_pred_tokens)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InvalidParameterError(f"{name} must be an int, not {type(value).__name__}")
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise InvalidParameterError(f"input_ids must be a 1-D array of token ids, not an array of shape "
                                        f"{ids.shape} and dtype {ids.dtype}")
        length = ids.shape[0]
        for size in range(min(int(max_ngram_size), length - 1), 0, -1):
            tail = ids[length - size:]
            # every window of `size` tokens, compared with the tail at once
            windows = np.lib.stride_tricks.sliding_window_view(ids, size)
            for start in np.flatnonzero((windows == tail).all(axis=1)):
                begin = int(start) + size
                end = min(begin + int(num_pred_tokens), length)
                if begin < end:  # the tail's own position has nothing after it
                    return ids[begin:end]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        return self.find_candidate_pred_tokens(input_ids=input_ids, max_ngram_size=self.max_ngram_size,
                                               num_pred_tokens=self.num_pred_tokens)

    def _llmplace_draft(self) -> dict:
        return {"lookup": True, "depth": draft_depth(self.num_pred_tokens)}


class LlamaDraftModelFile(LlamaDraftModel):
    """A draft model (a smaller GGUF of the same vocabulary, a path or an llmplace Model) proposing up to
    `num_pred_tokens` tokens per step through llmplace's speculative decoding."""

    def __init__(self, model: str | os.PathLike | Any, num_pred_tokens: int = 5) -> None:
        self.model = model
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError("LlamaDraftModelFile drafts inside llmplace's decoding loop; pass it to "
                                  "Llama(draft_model=...) instead of calling it")

    def _llmplace_draft(self) -> dict:
        return {"draft": os.fspath(self.model) if isinstance(self.model, (str, os.PathLike)) else self.model,
                "depth": draft_depth(self.num_pred_tokens)}


def speculation_options(draft_model) -> dict | None:
    """stream_generate keywords for a llama-cpp-python draft model, or None when llmplace cannot run it."""
    if draft_model is None:
        return None
    options = getattr(draft_model, "_llmplace_draft", None)
    if options is not None:
        return options()
    if type(draft_model).__name__ == "LlamaPromptLookupDecoding":  # llama-cpp-python's own class
        return {"lookup": True, "depth": draft_depth(getattr(draft_model, "num_pred_tokens", 10))}
    return None
