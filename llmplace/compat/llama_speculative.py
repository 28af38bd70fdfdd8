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
import os
from typing import Any

import numpy as np


class LlamaDraftModel(abc.ABC):
    """Base class of llama-cpp-python's draft models: `__call__(input_ids) -> proposed token ids`."""

    @abc.abstractmethod
    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError()


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt-lookup speculation: propose the tokens that followed the latest earlier occurrence of the last
    n-gram. num_pred_tokens: the most tokens drafted per step."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10) -> None:
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        n = len(ids)
        for size in range(min(self.max_ngram_size, n - 1), 0, -1):
            tail = ids[n - size:]
            for start in range(n - size - 1, -1, -1):
                if ids[start:start + size] == tail:
                    return np.array(ids[start + size:start + size + self.num_pred_tokens], dtype=np.intc)
        return np.array([], dtype=np.intc)

    def _llmplace_draft(self) -> dict:
        return {"lookup": True, "depth": max(1, int(self.num_pred_tokens))}


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
                "depth": max(1, int(self.num_pred_tokens))}


def speculation_options(draft_model) -> dict | None:
    """stream_generate keywords for a llama-cpp-python draft model, or None when llmplace cannot run it."""
    if draft_model is None:
        return None
    options = getattr(draft_model, "_llmplace_draft", None)
    if options is not None:
        return options()
    if type(draft_model).__name__ == "LlamaPromptLookupDecoding":  # llama-cpp-python's own class
        return {"lookup": True, "depth": max(1, int(getattr(draft_model, "num_pred_tokens", 10)))}
    return None
