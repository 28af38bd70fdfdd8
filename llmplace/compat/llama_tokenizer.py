"""llama-cpp-python's `llama_cpp.llama_tokenizer`: the tokenizer interface `Llama(tokenizer=...)` takes, the
model's own tokenizer, and a wrapper of a Hugging Face tokenizer.

`LlamaTokenizer(llm)` reads llm's vocabulary directly (not through `llm.tokenize`), so passing it to another
Llama as `tokenizer=` or back to llm itself cannot recurse.
"""

from __future__ import annotations

import abc
import numbers
from typing import Any

from ..errors import InvalidParameterError, TokenizationError


def vocab_detokenize(vocab, tokens, special: bool = False) -> bytes:
    """The bytes of `tokens` in `vocab` (an llmplace Vocab) as llama-cpp-python returns them: a list that starts
    with BOS loses the leading space of its text. llama-cpp-python does this for every vocabulary type; it
    matters for SPM vocabularies (Llama 2, Mistral), whose first word's piece carries the space the tokenizer
    prefixed it with (b" Hello" after BOS)."""
    try:
        ids = list(tokens)
    except TypeError:
        raise TokenizationError(f"tokens must be a list of token ids, not {type(tokens).__name__}") from None
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TokenizationError(f"token ids must be ints, not {type(t).__name__} ({t!r:.50}); pass a flat "
                                    f"list of ids")
    text = b"".join([vocab.piece(t, special=special) for t in ids])  # piece() refuses ids outside the vocabulary
    if vocab.bos is not None and ids and ids[0] == vocab.bos and text.startswith(b" "):
        return text[1:]
    return text


class BaseLlamaTokenizer(abc.ABC):
    """What Llama needs from a tokenizer: bytes to token ids and back."""

    @abc.abstractmethod
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of UTF-8 `text`; add_bos adds the model's BOS, special parses special-token text."""
        raise NotImplementedError

    @abc.abstractmethod
    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes `tokens` stand for; prev_tokens (the tokens before them) lets a tokenizer whose text
        depends on context return only the new part."""
        raise NotImplementedError


class LlamaTokenizer(BaseLlamaTokenizer):
    """The vocabulary of a loaded llmplace.compat.Llama."""

    def __init__(self, llama: Any) -> None:
        model = getattr(llama, "llmplace_model", None)
        if model is None:
            raise InvalidParameterError(f"LlamaTokenizer takes an llmplace.compat.Llama, not "
                                        f"{type(llama).__name__}")
        self._model = model

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._model.vocab.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        return vocab_detokenize(self._model.vocab, tokens, special=special)  # llama.cpp pieces need no context

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """tokenize() of a str (characters UTF-8 cannot encode, lone surrogates, are dropped)."""
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: list[int]) -> str:
        """detokenize() as a str (bytes that are not UTF-8, such as half a character, are dropped)."""
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str) -> LlamaTokenizer:
        """The tokenizer of a GGUF file, loaded without its weights."""
        from .llama import Llama

        return cls(Llama(model_path=path, vocab_only=True))


class LlamaHFTokenizer(BaseLlamaTokenizer):
    """A Hugging Face tokenizer (transformers' PreTrainedTokenizer or anything with its encode/decode)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        # As llama-cpp-python: `special` decides whether the tokenizer adds its special tokens (BOS ...).
        return self.hf_tokenizer.encode(text.decode("utf-8", errors="ignore"), add_special_tokens=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        skip = not special
        if prev_tokens is None:
            return self.hf_tokenizer.decode(tokens, skip_special_tokens=skip).encode("utf-8", errors="ignore")
        # The text of the new tokens is what they add to the text of the previous ones: a tokenizer may render a
        # token differently at the start of a text (e.g. without its leading space).
        before = self.hf_tokenizer.decode(prev_tokens, skip_special_tokens=skip).encode("utf-8", errors="ignore")
        after = self.hf_tokenizer.decode(list(prev_tokens) + list(tokens), skip_special_tokens=skip)
        return after.encode("utf-8", errors="ignore")[len(before):]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str) -> LlamaHFTokenizer:
        """transformers.AutoTokenizer.from_pretrained(pretrained_model_name_or_path), wrapped."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError("LlamaHFTokenizer.from_pretrained needs the transformers package: "
                              "pip install transformers") from exc
        return cls(AutoTokenizer.from_pretrained(pretrained_model_name_or_path=pretrained_model_name_or_path))
