"""Grammar-constrained sampling for llmplace.Llama: llama-cpp-python's `LlamaGrammar` (GBNF text) and the
llama.cpp grammar sampler that enforces it.

A grammar is checked when a model first uses it (llama.cpp's GBNF parser needs the model's vocabulary): an
invalid one raises InvalidParameterError quoting llama.cpp's reason, before anything is generated.
`LlamaGrammar.from_json_schema` / `json_schema_to_gbnf` convert with llama.cpp's own converter
(common/json-schema-to-grammar.cpp, through the shim); a schema it refuses raises JsonSchemaError (a ValueError)
at once; what it cannot enforce (e.g. an unanchored pattern) it relaxes with a warning llama.cpp prints on
stderr. llama-cpp-python converts in Python: the two accept nearly the same schemas, and the grammars they
write differ in rule names and whitespace, not in the JSON they allow.
"""

from __future__ import annotations

import json
from pathlib import Path


from .._ffi import C, ffi
from ..errors import InvalidParameterError
from ..grammar_mask import GrammarMask, check_repetition_bounds, gbnf_code
from ..native_errors import native_call

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


class JsonSchemaError(InvalidParameterError):
    """A JSON schema that is not JSON, or that llama.cpp's schema-to-grammar converter refuses (a ValueError)."""


_SCHEMA_ERROR_KIND = {-1: "not JSON", -2: "refused by llama.cpp's converter"}

# llama.cpp's GBNF parser, its left-recursion check and its JSON-schema converter recurse once per nesting level
# (and per rule of a chain r0 ::= r1, r1 ::= r2 ...) with no limit: 100k levels overflow the C stack (SIGSEGV),
# and the converter's output grows with the square of a schema's depth (10k levels: 750 MB). Bounded here, far
# above what real grammars and schemas use.
MAX_GRAMMAR_DEPTH = 256
MAX_GRAMMAR_RULES = 4096
MAX_SCHEMA_DEPTH = 128


def check_grammar_size(text: str) -> None:
    """Raise InvalidParameterError if GBNF `text` nests groups deeper than MAX_GRAMMAR_DEPTH or defines more
    than MAX_GRAMMAR_RULES rules. The scan skips strings, character classes and comments, without recursion."""
    rules = text.count("::=")
    if rules > MAX_GRAMMAR_RULES:
        raise InvalidParameterError(f"the grammar defines {rules} rules, more than the {MAX_GRAMMAR_RULES} "
                                    "llmplace accepts (llama.cpp's grammar code recurses through chains of rules)")
    depth = deepest = 0
    for _, c in gbnf_code(text):
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_DEPTH:
        raise InvalidParameterError(f"the grammar nests groups {deepest} deep, more than the {MAX_GRAMMAR_DEPTH} "
                                    "llmplace accepts (llama.cpp's grammar parser would overflow its stack); "
                                    "flatten it with named rules")
    check_repetition_bounds(text)


def _json_depth(schema) -> int:
    """Nesting depth of JSON text (objects and arrays, outside strings) or of parsed JSON, without recursion."""
    if isinstance(schema, str):
        depth = deepest = 0
        in_string = escaped = False
        for c in schema:
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
                deepest = max(deepest, depth)
            elif c in "}]":
                depth -= 1
        return deepest
    deepest, stack = 0, [(schema, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_SCHEMA_DEPTH:
                return deepest  # enough to refuse; a self-containing dict would loop forever
            stack.extend((item, depth) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def _ordered_properties(schema, order: dict[str, int]):
    """The schema with every "properties" object's keys put in `order` first (the rest after, as they were):
    llama.cpp's converter writes properties in their JSON order."""
    if isinstance(schema, list):
        return [_ordered_properties(item, order) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _ordered_properties(value, order) for key, value in schema.items()}
    properties = out.get("properties")
    if isinstance(properties, dict):
        keys = sorted(properties, key=lambda k: (order.get(k, len(order)), list(properties).index(k)))
        out["properties"] = {k: properties[k] for k in keys}
    return out


def json_schema_to_gbnf(schema: str, prop_order: list[str] | None = None) -> str:
    """The GBNF grammar (root rule "root") of JSON text that validates against `schema` (JSON text; a dict is
    taken too), written by llama.cpp's converter. prop_order: property names to write first, in that order,
    in every object. Raises JsonSchemaError naming what is wrong."""
    depth = _json_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise JsonSchemaError(f"the JSON schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep, "
                              f"the most llmplace accepts (llama.cpp's "
                              "converter would overflow its stack, or write a grammar of gigabytes)")
    if not isinstance(schema, str):
        try:
            schema = json.dumps(schema)
        except (TypeError, ValueError) as exc:
            raise JsonSchemaError(f"the JSON schema cannot be written as JSON: {exc}") from None
    if prop_order:
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise JsonSchemaError(f"invalid JSON schema (not JSON): {exc}") from None
        schema = json.dumps(_ordered_properties(parsed, {name: i for i, name in enumerate(prop_order)}))
    source = schema.encode("utf-8")
    if b"\0" in source:
        raise JsonSchemaError("invalid JSON schema: it holds a NUL character")
    size = 4096
    for _ in range(3):  # the needed size is known after the first call; the retry is exact
        out = ffi.new("char[]", size)
        n = C.llmplace_json_schema_to_grammar(source, out, size)
        if n < 0:
            reason = ffi.string(out).decode("utf-8", "replace").strip()
            for prefix in ("JSON schema conversion failed:", "the schema is not valid JSON:"):
                reason = reason.removeprefix(prefix).strip()
            raise JsonSchemaError(f"invalid JSON schema ({_SCHEMA_ERROR_KIND.get(n, 'conversion failed')}): "
                                  f"{reason or 'no reason given'}")
        if n < size:
            return ffi.string(out, n).decode("utf-8")
        size = n + 1
    raise JsonSchemaError("invalid JSON schema: the converter's output kept changing size")  # never seen


class LlamaGrammar:
    """A GBNF grammar (llama.cpp's format) for `grammar=` of create_completion / create_chat_completion."""

    def __init__(self, *args, _grammar: str, **kwargs) -> None:
        if not isinstance(_grammar, str) or not _grammar.strip():
            raise InvalidParameterError("a grammar must be non-empty GBNF text, e.g. 'root ::= \"yes\" | \"no\"'")
        check_grammar_size(_grammar)
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
        """The grammar of JSON that validates against `json_schema` (JSON text), converted by llama.cpp.
        Raises JsonSchemaError (a ValueError) naming what is wrong with the schema."""
        return cls.from_string(json_schema_to_gbnf(json_schema), verbose=verbose)

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


class GrammarConstraint(GrammarMask):
    """llama.cpp's grammar sampler for one model (GBNF text, a LlamaGrammar, llama-cpp-python's LlamaGrammar),
    as a mask on a logits buffer before the sampler chain draws (grammar_mask.GrammarMask)."""

    _closed_message = "this grammar constraint is closed"

    def __init__(self, model, grammar) -> None:
        text, root = grammar_text(grammar)
        check_grammar_size(text)
        if "\0" in text or "\0" in root:
            raise InvalidParameterError("the grammar holds a NUL character, which would cut it short in llama.cpp")
        with model._lifetime:  # Model.close() elsewhere waits for it
            sampler = native_call(C.llama_sampler_init_grammar, model.vocab._ptr, text.encode("utf-8"),
                                  root.encode("utf-8"), error=lambda reason: InvalidParameterError(
                                      f"llama.cpp rejected the grammar: {reason}. Check its GBNF syntax (rule "
                                      f"'{root}' must exist)"))
        self._bind(sampler, model.n_vocab)
