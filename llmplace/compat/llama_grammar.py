"""Grammar-constrained sampling for llmplace.Llama: llama-cpp-python's `LlamaGrammar` (GBNF text) and the
llama.cpp grammar sampler that enforces it.

A grammar is checked when a model first uses it (llama.cpp's GBNF parser needs the model's vocabulary): an
invalid one raises InvalidParameterError quoting llama.cpp's reason, before anything is generated.
`LlamaGrammar.from_json_schema` is not provided yet (llama-cpp-python converts schemas in Python).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import logs
from .._ffi import C, ffi
from .._handle import NativeObject
from ..errors import InvalidParameterError
from .errors import UnsupportedFeatureError

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"

# Any JSON object (llama.cpp's grammars/json.gbnf): what response_format={"type": "json_object"} asks for.
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4})
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= | " " | "\n" [ \t]{0,20}
"""


class LlamaGrammar:
    """A GBNF grammar (llama.cpp's format) for `grammar=` of create_completion / create_chat_completion."""

    def __init__(self, *args, _grammar: str, **kwargs) -> None:
        if not isinstance(_grammar, str) or not _grammar.strip():
            raise InvalidParameterError("a grammar must be non-empty GBNF text, e.g. 'root ::= \"yes\" | \"no\"'")
        self._grammar = _grammar
        self._root = LLAMA_GRAMMAR_DEFAULT_ROOT

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: str | Path, verbose: bool = True) -> LlamaGrammar:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise InvalidParameterError(f"cannot read the grammar file {file}: {exc}") from None
        return cls.from_string(text, verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> LlamaGrammar:
        raise UnsupportedFeatureError("LlamaGrammar.from_json_schema is not supported by llmplace yet; write the "
                                      "GBNF yourself, or use JSON_GBNF (any JSON object)")

    def __repr__(self) -> str:
        return f"LlamaGrammar({self._grammar[:40]!r}...)"


def grammar_text(grammar) -> tuple[str, str]:
    """(GBNF text, root rule) of a LlamaGrammar, llama-cpp-python's LlamaGrammar, or a GBNF string."""
    if isinstance(grammar, str):
        return grammar, LLAMA_GRAMMAR_DEFAULT_ROOT
    text = getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise InvalidParameterError(f"grammar must be a LlamaGrammar or GBNF text, not {type(grammar).__name__}")
    return text, getattr(grammar, "_root", LLAMA_GRAMMAR_DEFAULT_ROOT)


class GrammarConstraint(NativeObject):
    """llama.cpp's grammar sampler for one model, applied to a logits buffer before the sampler chain draws:
    tokens the grammar does not allow next get -inf. `accept(token)` advances the grammar."""

    _closed_message = "this grammar constraint is closed"

    def __init__(self, model, grammar) -> None:
        text, root = grammar_text(grammar)
        with logs.capture() as native_messages:
            sampler = C.llama_sampler_init_grammar(model.vocab._ptr, text.encode("utf-8"), root.encode("utf-8"))
        if sampler == ffi.NULL:
            reason = "; ".join(m for m in native_messages if m) or "no reason given"
            raise InvalidParameterError(f"llama.cpp rejected the grammar: {reason}. Check its GBNF syntax (rule "
                                        f"'{root}' must exist)")
        self._own(sampler, C.llama_sampler_free)
        n = model.n_vocab
        self._data = ffi.new("llama_token_data[]", n)
        self._array = ffi.new("llama_token_data_array *")
        self._n = n
        # A numpy view of the C array: filling and reading 150k+ numbers stays out of Python loops.
        self._view = np.frombuffer(ffi.buffer(self._data), dtype=np.dtype(
            [("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True))
        self._ids = np.arange(n, dtype=np.int32)

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place."""
        view = self._view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array = self._array
        array.data, array.size, array.selected, array.sorted = self._data, self._n, -1, False
        C.llama_sampler_apply(self._ptr, array)
        if array.size != self._n:  # never seen: the grammar sampler masks, it does not drop candidates
            masked = np.full(self._n, -np.inf, dtype=np.float32)
            kept = view[:array.size]
            masked[kept["id"]] = kept["logit"]
            logits[:] = masked
        else:
            logits[view["id"]] = view["logit"]

    def accept(self, token: int) -> None:
        C.llama_sampler_accept(self._ptr, token)
