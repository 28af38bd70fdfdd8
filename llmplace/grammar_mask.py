"""A llama.cpp grammar sampler used as a mask on a logits buffer: tokens the grammar does not allow next get
-inf (`apply`), and `accept(token)` advances it. The drop-in's grammars (compat.llama_grammar.GrammarConstraint)
and the tool-call grammars of llama.cpp's chat layer (chat_tools.ToolCallGrammar) differ only in how their
sampler is made: both are this class once it is.

The mask runs on the logits a caller holds (after its logits processors), before the sampler chain draws from
them, as llama-cpp-python applies its grammars: so the chain itself stays the one `sampling.Sampler` builds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._ffi import C, ffi
from ._handle import NativeObject
from .errors import InvalidParameterError

_BOUNDS = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")


def gbnf_code(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of GBNF `text` outside its strings, character classes and comments, without recursion:
    the characters that make its structure (groups, repetitions, rule definitions)."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        else:
            yield i, c
        i += 1


def check_repetition_bounds(text: str) -> None:
    """Raise InvalidParameterError for a repetition x{m,n} with n < m in GBNF `text` (outside strings, character
    classes and comments): llama.cpp's grammar parser counts n - m copies in an unsigned type, so it allocates
    without end (the process hangs, then is killed for memory). JSON schemas with minItems > maxItems or
    minLength > maxLength become such repetitions."""
    for i, c in gbnf_code(text):
        if c == "{":
            bounds = _BOUNDS.match(text, i)
            if bounds and int(bounds.group(2)) < int(bounds.group(1)):
                raise InvalidParameterError(
                    f"the grammar repeats an item {bounds.group(0)}: at most {bounds.group(2)} times but at least "
                    f"{bounds.group(1)} (a JSON schema's maxItems / maxLength below its minItems / minLength); "
                    "llama.cpp's grammar parser cannot build that")


class GrammarMask(NativeObject):
    """Subclasses create the grammar sampler (under the model's lifetime) and hand it to `_bind`."""

    def _bind(self, sampler: Any, n_vocab: int) -> None:
        self._own(sampler, C.llama_sampler_free)
        self._data = ffi.new("llama_token_data[]", n_vocab)
        self._array = ffi.new("llama_token_data_array *")
        self._n = n_vocab
        # A numpy view of the C array: filling and reading 150k+ numbers stays out of Python loops.
        self._view = np.frombuffer(ffi.buffer(self._data), dtype=np.dtype(
            [("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True))
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._accepted = 0  # tokens accepted so far, for the message of a grammar that can go no further
        self._err = ffi.new("char[]", 512)

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place."""
        view = self._view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array = self._array
        array.data, array.size, array.selected, array.sorted = self._data, self._n, -1, False
        with self._lifetime:  # close() in another thread waits for it
            if not C.llmplace_sampler_apply(self._ptr, array, self._err, len(self._err)):
                raise self._dead_end(ffi.string(self._err).decode("utf-8", "replace"))
        if array.size != self._n:  # never seen: the grammar sampler masks, it does not drop candidates
            masked = np.full(self._n, -np.inf, dtype=np.float32)
            kept = view[:array.size]
            masked[kept["id"]] = kept["logit"]
            logits[:] = masked
        else:
            logits[view["id"]] = view["logit"]
        if np.isneginf(logits).all():
            # Nothing may follow (an empty character range such as [z-a], a token outside the vocabulary, integer
            # bounds with no integer between them): drawn anyway, the token would make llama.cpp's accept throw,
            # and at temperature 0 the draw would be a silent, empty "stop".
            raise self._dead_end("every token of the vocabulary is forbidden next")

    def accept(self, token: int) -> None:
        with self._lifetime:
            if not C.llmplace_sampler_accept(self._ptr, token, self._err, len(self._err)):
                raise InvalidParameterError(
                    f"the grammar refused the token drawn after the {self._accepted} tokens it accepted (llama.cpp: "
                    f"{ffi.string(self._err).decode('utf-8', 'replace')}): logits the grammar did not mask (a "
                    "logits processor returning NaN, say) let a token it forbids be drawn")
        self._accepted += 1

    def _dead_end(self, reason: str) -> InvalidParameterError:
        return InvalidParameterError(
            f"the grammar allows no text after the {self._accepted} tokens it accepted ({reason}): no output can "
            "match it from there. Check the grammar, or the JSON schema or tool parameters it was made from, for a "
            "rule no text meets: an empty character range such as [z-a], a token outside the vocabulary, or bounds "
            "that no value satisfies (an integer with exclusiveMinimum 5 and exclusiveMaximum 6)")
