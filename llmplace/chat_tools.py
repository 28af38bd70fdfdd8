"""Tools the model chooses itself, and reasoning, through llama.cpp's own chat layer (common/chat).

llama.cpp knows, per model family, how a template describes tools, what a tool call looks like in the output
(Hermes' <tool_call>, Mistral's [TOOL_CALLS], Llama 3's <|python_tag|>, ...) and how thinking is delimited
(<think>...</think> and others). Rather than re-writing those parsers here, the shim exposes common/chat with JSON
in and out, and this module wraps it:

- `ChatTemplates(model)` (or a template's source) `.render(messages, tools=..., tool_choice=...)` gives a
  `RenderedChat`: the prompt, the tool-call grammar (lazy: it starts at the family's trigger, so a reply in
  plain text stays free), its triggers, extra stop strings and the serialized reply parser;
- `RenderedChat.reply_parser()` reads a reply back into a `ParsedReply` (content, reasoning_content, tool calls),
  whole or partial (while streaming), and `ReplyStream` turns growing text into OpenAI-style deltas;
- `ToolCallGrammar(model, rendered)` is the grammar constraint generation applies (apply/accept/close, as
  compat.llama_grammar.GrammarConstraint).

Errors: a tool whose parameters schema the grammar builder refuses raises ToolSchemaError; output the parser
cannot read raises ToolCallParseError; messages/tools llama.cpp cannot read raise InvalidParameterError; a
template it cannot render or analyse raises TemplateError.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._ffi import C, ffi
from ._handle import NativeObject
from .chat_template import check_for_native_engine
from .grammar_mask import GrammarMask, check_repetition_bounds
from .errors import InvalidParameterError, LlmplaceError, TemplateError
from .native_errors import native_call

TOOL_CHOICES = ("auto", "required", "none")
# llama-server's --reasoning-format names: "none" leaves thinking inline in content; "auto" / "deepseek" put it in
# reasoning_content (also in stream deltas); "deepseek-legacy" puts it in reasoning_content but streams it inline.
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")

_ERR_SIZE = 4096
# Nesting beyond this could overflow the C stack in llama.cpp's recursive schema converter (as
# compat.llama_grammar.MAX_SCHEMA_DEPTH bounds for response_format schemas).
MAX_TOOL_SCHEMA_DEPTH = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ToolSchemaError(InvalidParameterError):
    """A tool's `parameters` JSON schema that llama.cpp's grammar builder refuses (a ValueError)."""


class ToolCallParseError(LlmplaceError, ValueError):
    """Model output that llama.cpp's parser for the template's format cannot read as content and tool calls."""


@dataclass(frozen=True)
class GrammarTrigger:
    """Where a lazy grammar starts: kind "word" (a literal), "pattern" (a regex matched anywhere), "pattern_full"
    (a regex matching the whole output so far) or "token" (a token id)."""
    kind: str
    value: str
    token: int = -1


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API gives it
    id: str = ""

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        return {"id": call_id or self.id or new_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedReply:
    content: str
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


def new_call_id() -> str:
    """A tool call id in OpenAI's shape ("call_" + 24 letters and digits), for formats whose calls carry none."""
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def _error_text(err) -> str:
    return ffi.string(err).decode("utf-8", errors="replace")


def _take_string(out) -> str:
    try:
        return ffi.string(out[0]).decode("utf-8", errors="replace")
    finally:
        C.llmplace_string_free(out[0])


def _schema_depth(value: Any, depth: int = 0) -> int:
    if depth > MAX_TOOL_SCHEMA_DEPTH:
        return depth
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_schema_depth(child, depth + 1) for child in children), default=depth)


def _apply_error(code: int, reason: str) -> LlmplaceError:
    if code == -1 or reason.startswith(("Failed to parse tools", "Expected 'messages'", "Expected 'message'",
                                        "Missing 'role'", "Invalid tool_choice", "Failed to parse messages",
                                        "Failed to parse tool call arguments")):
        return InvalidParameterError(f"llama.cpp's chat layer cannot read the request: {reason}")
    if "JSON schema" in reason or "schema conversion" in reason:
        return ToolSchemaError(f"a tool's parameters schema is refused by llama.cpp's grammar builder: {reason}. "
                               "Simplify the schema (supported: JSON Schema types, properties, required, items, "
                               "enum, const, anyOf/oneOf, local $ref)")
    return TemplateError(f"llama.cpp's chat layer could not render the template: {reason}")


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI tools: a list of {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise InvalidParameterError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, not "
                                    f"{type(tools).__name__}")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidParameterError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                        f"'parameters': {{...}}}}}}, got {tool!r:.200}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidParameterError(f"tools[{i}]['function'] needs a 'name' (a non-empty string)")
        if not _TOOL_NAME.fullmatch(name):
            # Names are written into the prompt and into the call's grammar as they are: a quote, a newline or a
            # space there would break the format the model is asked to write.
            raise InvalidParameterError(f"tools[{i}]: function name {name[:80]!r} must be 1 to 64 letters, digits, "
                                        "'_', '-' or '.' (as OpenAI's API requires, plus '.')")
        if name in seen:
            raise InvalidParameterError(f"tools[{i}]: a second function named {name!r}; tool names must differ")
        seen.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise InvalidParameterError(f"function {name!r}: description must be a str, not "
                                        f"{type(function['description']).__name__}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolSchemaError(f"function {function['name']!r}: parameters must be a JSON schema object, not "
                                  f"{type(parameters).__name__}")
        if _schema_depth(parameters) > MAX_TOOL_SCHEMA_DEPTH:
            raise ToolSchemaError(f"function {function['name']!r}: its parameters schema nests deeper than "
                                  f"{MAX_TOOL_SCHEMA_DEPTH} levels; flatten it")
    return list(tools)


def check_tool_messages(messages: Any) -> None:
    """The tool turns of a conversation in OpenAI's shape: an assistant message's tool_calls a list of
    {"id"?, "type": "function", "function": {"name": str, "arguments": JSON text or object}}, and each "tool"
    message answering a call of the assistant message just before it (by tool_call_id when the calls have ids).
    llama.cpp's chat layer would render a result answering nothing as if it did, which misleads the model."""
    if not isinstance(messages, (list, tuple)):
        return  # the message list's own check says what is wrong
    calls: list[dict[str, Any]] | None = None  # the calls the tool messages here may answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return
        role = message.get("role")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise InvalidParameterError(f"message {i} has tool_calls but role {role!r}: only assistant "
                                            "messages make tool calls")
            if not isinstance(tool_calls, (list, tuple)):
                raise InvalidParameterError(f"message {i}'s tool_calls must be a list, not "
                                            f"{type(tool_calls).__name__}")
            for j, call in enumerate(tool_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                        not isinstance(function.get("arguments"), (str, dict)) or \
                        not isinstance(call.get("id", ""), str):
                    raise InvalidParameterError(
                        f"message {i}'s tool_calls[{j}] must be {{'id': str, 'type': 'function', 'function': "
                        f"{{'name': str, 'arguments': JSON text}}}}, got {call!r:.200}")
            calls = list(tool_calls)
        elif role == "tool":
            if not calls:
                raise InvalidParameterError(f"message {i} (role 'tool') answers no tool call: a tool result must "
                                            "follow the assistant message whose tool_calls it answers")
            call_id = message.get("tool_call_id")
            ids = [c["id"] for c in calls if c.get("id")]
            if call_id is not None and not isinstance(call_id, str):
                raise InvalidParameterError(f"message {i}'s tool_call_id must be a str, not "
                                            f"{type(call_id).__name__}")
            if call_id is not None and ids and call_id not in ids:
                raise InvalidParameterError(f"message {i} (role 'tool') answers tool_call_id {call_id!r}, which "
                                            f"no call of the assistant message before it has (its calls: "
                                            f"{', '.join(map(repr, ids))})")
        else:
            calls = None


def resolve_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict] | None, str]:
    """(tools, choice) for common/chat, which knows "auto", "required" and "none": a named function
    ({"type": "function", "function": {"name": N}}) becomes "required" over that one tool, as llama-server does."""
    if tool_choice is None:
        return tools, "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise InvalidParameterError(f"tool_choice must be 'auto', 'required', 'none' or {{'type': 'function', "
                                        f"'function': {{'name': ...}}}}, not {tool_choice!r}")
        return tools, tool_choice
    chosen = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = chosen.get("name") if isinstance(chosen, dict) else None
    if not isinstance(name, str):
        raise InvalidParameterError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', "
                                    "'function': {'name': <function name>}}")
    for tool in tools or []:
        if tool["function"].get("name") == name:
            return [tool], "required"
    raise InvalidParameterError(f"Tool choice '{name}' not found in tools.")


@dataclass(frozen=True)
class RenderedChat:
    """What common_chat_templates_apply gave for one request."""
    prompt: str
    format: int
    format_name: str
    grammar: str
    grammar_lazy: bool
    grammar_triggers: tuple[GrammarTrigger, ...]
    preserved_tokens: tuple[str, ...]
    additional_stops: tuple[str, ...]
    generation_prompt: str
    parser: str = field(repr=False)
    supports_thinking: bool
    thinking_start_tag: str
    thinking_end_tags: tuple[str, ...]
    caps: dict[str, bool]
    supports_enable_thinking: bool
    reasoning_format: str = "none"

    @classmethod
    def from_json(cls, data: dict[str, Any], reasoning_format: str) -> RenderedChat:
        return cls(prompt=data["prompt"], format=data["format"], format_name=data["format_name"],
                   grammar=data["grammar"], grammar_lazy=data["grammar_lazy"],
                   grammar_triggers=tuple(GrammarTrigger(t["type"], t["value"], t["token"])
                                          for t in data["grammar_triggers"]),
                   preserved_tokens=tuple(data["preserved_tokens"]), additional_stops=tuple(data["additional_stops"]),
                   generation_prompt=data["generation_prompt"], parser=data["parser"],
                   supports_thinking=data["supports_thinking"], thinking_start_tag=data["thinking_start_tag"],
                   thinking_end_tags=tuple(data["thinking_end_tags"]), caps=dict(data["caps"]),
                   supports_enable_thinking=data["supports_enable_thinking"], reasoning_format=reasoning_format)

    def reply_parser(self, *, reasoning_in_content: bool = False, parse_tool_calls: bool = True) -> ReplyParser:
        return ReplyParser(self, reasoning_in_content=reasoning_in_content, parse_tool_calls=parse_tool_calls)


class ChatTemplates(NativeObject):
    """A model's chat templates (its default and "tool_use" ones) in llama.cpp's chat layer, or a template given
    as source (then `model` may be None and bos_token/eos_token name those tokens as text)."""

    _closed_message = "these chat templates are closed"

    def __init__(self, model: Any = None, template: str | None = None, *, bos_token: str = "",
                 eos_token: str = "") -> None:
        if model is None and not template:
            raise InvalidParameterError("ChatTemplates needs a model or a template's source")
        sources = [template] if template else [model.chat_template, model.named_chat_template("tool_use")]
        for text in sources:
            if text:
                check_for_native_engine(text)
        err = ffi.new("char[]", _ERR_SIZE)
        model_ptr = model._ptr if model is not None else ffi.NULL
        source = template.encode("utf-8") if template else ffi.NULL
        handle = C.llmplace_chat_templates_new(model_ptr, source, bos_token.encode("utf-8"),
                                               eos_token.encode("utf-8"), err, _ERR_SIZE)
        if handle == ffi.NULL:
            raise TemplateError(f"llama.cpp's chat layer cannot read the chat template: {_error_text(err)}")
        self._own(handle, C.llmplace_chat_templates_free)

    def __enter__(self) -> ChatTemplates:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def render(self, messages: list[dict[str, Any]], *, tools: Any = None, tool_choice: Any = "auto",
               parallel_tool_calls: bool = False, reasoning_format: str = "auto", enable_thinking: bool = True,
               chat_template_kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True,
               json_schema: dict[str, Any] | None = None) -> RenderedChat:
        """Render `messages` (OpenAI shape, including assistant tool_calls and tool results) with `tools`.

        tool_choice: "auto" (a lazy grammar starts at the family's tool-call trigger), "required" (a call is
        forced), "none" (tools are described but no call is parsed) or {"type": "function", "function":
        {"name": N}} (a call of N is forced). reasoning_format: see REASONING_FORMATS. enable_thinking=False
        asks templates that support it for no thinking."""
        tools, choice = resolve_tool_choice(check_tools(tools), tool_choice)
        check_tool_messages(messages)
        if reasoning_format not in REASONING_FORMATS:
            raise InvalidParameterError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, not "
                                        f"{reasoning_format!r}")
        request = {"messages": messages, "tools": tools or None, "tool_choice": choice,
                   "parallel_tool_calls": bool(parallel_tool_calls), "reasoning_format": reasoning_format,
                   "enable_thinking": bool(enable_thinking), "chat_template_kwargs": chat_template_kwargs or {},
                   "add_generation_prompt": bool(add_generation_prompt), "json_schema": json_schema}
        try:
            text = json.dumps(request)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"the messages or tools are not JSON-serializable: {exc}") from None
        err = ffi.new("char[]", _ERR_SIZE)
        out = ffi.new("char **")
        with self._lifetime:
            code = C.llmplace_chat_templates_apply(self._ptr, text.encode("utf-8"), out, err, _ERR_SIZE)
        if code != 0:
            raise _apply_error(code, _error_text(err))
        return RenderedChat.from_json(json.loads(_take_string(out)), reasoning_format)


# Nesting of [ and { a reply may hold for the parser (tool-call arguments nest a few levels).
MAX_REPLY_NESTING = 512


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { in `text`, counted as if no bracket were inside a string (so never less than
    the JSON nesting the parser would recurse through), without recursion."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


_BRACKETS = re.compile(r"[\[\]{}]")


class ReplyParser(NativeObject):
    """Reads a reply (whole, or partial while it streams) into content, reasoning and tool calls, with the
    parser common/chat built for the rendered request."""

    _closed_message = "this reply parser is closed"

    def __init__(self, rendered: RenderedChat, *, reasoning_in_content: bool = False,
                 parse_tool_calls: bool = True) -> None:
        params = {"format": rendered.format, "parser": rendered.parser,
                  "generation_prompt": rendered.generation_prompt, "reasoning_format": rendered.reasoning_format,
                  "reasoning_in_content": bool(reasoning_in_content), "parse_tool_calls": bool(parse_tool_calls)}
        err = ffi.new("char[]", _ERR_SIZE)
        handle = C.llmplace_chat_parser_new(json.dumps(params).encode("utf-8"), err, _ERR_SIZE)
        if handle == ffi.NULL:
            raise InvalidParameterError(f"llama.cpp's chat layer cannot build the reply parser: {_error_text(err)}")
        self._own(handle, C.llmplace_chat_parser_free)
        self.format_name = rendered.format_name

    def __enter__(self) -> ReplyParser:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def parse(self, text: str, *, partial: bool = False) -> ParsedReply:
        if not isinstance(text, str):
            raise InvalidParameterError(f"the reply to parse must be a str, not {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidParameterError(f"the reply is not Unicode text that UTF-8 can hold ({exc.reason} at "
                                        f"{exc.start}): a lone surrogate, e.g. from bytes decoded with "
                                        "surrogateescape") from None
        depth = _bracket_depth(text)
        if depth > MAX_REPLY_NESTING:
            # llama.cpp's parser recurses once per level of the JSON in a call: 100k levels overflow its stack.
            raise ToolCallParseError(f"the model's reply nests brackets {depth} levels deep, more than the "
                                     f"{MAX_REPLY_NESTING} llmplace reads as tool calls; reply: {text[:200]!r}")
        err = ffi.new("char[]", _ERR_SIZE)
        out = ffi.new("char **")
        with self._lifetime:
            code = C.llmplace_chat_parser_parse(self._ptr, data, len(data), 1 if partial else 0, out, err,
                                                _ERR_SIZE)
        if code != 0:
            reason = _error_text(err)
            if code == -2:
                raise ToolCallParseError(f"the model's reply cannot be read as {self.format_name} output (content "
                                         f"and tool calls): {reason}. Reply: {text[:200]!r}")
            raise InvalidParameterError(f"llama.cpp's chat layer cannot parse the reply: {reason}")
        value = json.loads(_take_string(out))
        return ParsedReply(value["content"], value["reasoning_content"],
                           tuple(ToolCall(c["name"], c["arguments"], c["id"]) for c in value["tool_calls"]))


class ReplyStream:
    """Growing reply text -> OpenAI chat deltas ({"content": ...}, {"reasoning_content": ...}, {"tool_calls":
    [{"index", "id", "type", "function": {"name", "arguments"}}]}): each feed re-parses the text so far as a
    partial reply and emits what is new, as llama-server's common_chat_msg_diff does. Tool call ids are made
    once per call and kept."""

    def __init__(self, parser: ReplyParser) -> None:
        self._parser = parser
        self._text = ""
        self._last = ParsedReply("")
        self._ids: list[str] = []

    @property
    def text(self) -> str:
        return self._text

    def close(self) -> None:
        """Close the parser it reads with."""
        self._parser.close()

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self._text += piece
        try:
            parsed = self._parser.parse(self._text, partial=True)
        except ToolCallParseError:
            return []  # not readable yet: more text may complete it; finish() decides
        return self._deltas(parsed)

    def finish(self, *, partial: bool = False) -> tuple[ParsedReply, list[dict[str, Any]]]:
        """The whole reply parsed (partial=True when generation stopped early, e.g. at max_tokens) and the last
        deltas."""
        parsed = self._parser.parse(self._text, partial=partial)
        deltas = self._deltas(parsed)
        return self.with_ids(parsed), deltas

    def with_ids(self, parsed: ParsedReply) -> ParsedReply:
        calls = tuple(ToolCall(c.name, c.arguments, self._id(i, c)) for i, c in enumerate(parsed.tool_calls))
        return ParsedReply(parsed.content, parsed.reasoning_content, calls)

    def _id(self, index: int, call: ToolCall) -> str:
        while len(self._ids) <= index:
            self._ids.append(call.id or new_call_id())
        return self._ids[index]

    def _deltas(self, parsed: ParsedReply) -> list[dict[str, Any]]:
        last = self._last
        deltas: list[dict[str, Any]] = []
        if parsed.reasoning_content != last.reasoning_content and \
                parsed.reasoning_content.startswith(last.reasoning_content):
            deltas.append({"reasoning_content": parsed.reasoning_content[len(last.reasoning_content):]})
        if parsed.content != last.content and parsed.content.startswith(last.content):
            deltas.append({"content": parsed.content[len(last.content):]})
        for index, call in enumerate(parsed.tool_calls):
            if not call.name:
                continue  # the name is still being written: sent once complete
            if index >= len(last.tool_calls) or not last.tool_calls[index].name:
                deltas.append({"tool_calls": [{"index": index, "id": self._id(index, call), "type": "function",
                                               "function": {"name": call.name, "arguments": call.arguments}}]})
            else:
                before = last.tool_calls[index].arguments
                if call.arguments != before and call.arguments.startswith(before):
                    deltas.append({"tool_calls": [{"index": index, "function":
                                                   {"arguments": call.arguments[len(before):]}}]})
        self._last = parsed
        return deltas


def _grammar_refused(reason: str) -> ToolSchemaError:
    return ToolSchemaError(f"llama.cpp could not build the tool-call grammar: {reason}")


class ToolCallGrammar(GrammarMask):
    """The grammar common/chat built for a request, as a constraint on generation (apply(logits) masks what it
    forbids, accept(token) advances it). Lazy for tool_choice "auto": free text until a trigger word, pattern or
    token appears, then only a well-formed call. Not lazy ("required", a named function): the grammar's first
    rule is the generation prompt the template already wrote, so those tokens are fed to it first, as
    llama.cpp's common_sampler does."""

    _closed_message = "this tool-call grammar is closed"

    def __init__(self, model: Any, rendered: RenderedChat) -> None:
        if not rendered.grammar:
            raise InvalidParameterError("the rendered chat has no grammar (no tools, or tool_choice 'none')")
        vocab = model.vocab
        try:
            check_repetition_bounds(rendered.grammar)
        except InvalidParameterError as exc:
            raise _grammar_refused(str(exc)) from None
        grammar = rendered.grammar.encode("utf-8")
        if rendered.grammar_lazy:
            patterns, tokens = [], []
            for trigger in rendered.grammar_triggers:
                if trigger.kind == "token":
                    tokens.append(trigger.token)
                elif trigger.kind == "word":
                    patterns.append(_regex_escape(trigger.value))
                elif trigger.kind == "pattern":
                    patterns.append(trigger.value)
                else:  # pattern_full: anchored at both ends, as common_sampler anchors it
                    value = trigger.value
                    patterns.append(("" if value.startswith("^") else "^") + value +
                                    ("" if value.endswith("$") else "$") if value else "^$")
            keep = [ffi.new("char[]", p.encode("utf-8")) for p in patterns]
            c_patterns = ffi.new("char *[]", keep) if keep else ffi.NULL
            c_tokens = ffi.new("llama_token[]", tokens) if tokens else ffi.NULL
            with model._lifetime:
                sampler = native_call(C.llama_sampler_init_grammar_lazy_patterns, vocab._ptr, grammar, b"root",
                                      c_patterns, len(keep), c_tokens, len(tokens), error=_grammar_refused)
        else:
            with model._lifetime:
                sampler = native_call(C.llama_sampler_init_grammar, vocab._ptr, grammar, b"root",
                                      error=_grammar_refused)
        self._bind(sampler, model.n_vocab)
        if not rendered.grammar_lazy and rendered.generation_prompt:
            prefill = vocab.tokenize(rendered.generation_prompt, add_special=False, parse_special=True)
            for i, token in enumerate(prefill):
                piece = vocab.token_text(token)
                # Some tokenizers put a space before the first special token: llama.cpp skips it too.
                if i == 0 and piece[:1].isspace() and not rendered.generation_prompt[:1].isspace():
                    continue
                self.accept(token)


class ThinkingBudget:
    """A logits processor (llama-cpp-python's (input_ids, scores) -> scores) that ends the model's thinking after
    `budget` tokens, as llama-server's --reasoning-budget: once that many tokens were generated inside the
    thinking block, the template's end tag is forced, token by token; budget 0 closes the block at once. A
    template that does not think leaves it idle. Put it after other processors: what it forces wins."""

    def __init__(self, model: Any, rendered: RenderedChat, budget: int) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise InvalidParameterError(f"the reasoning budget must be a number of tokens >= 0, not {budget!r}")
        self._vocab = model.vocab
        self._budget = budget
        self._start = rendered.thinking_start_tag
        self._ends = rendered.thinking_end_tags
        self._active = rendered.supports_thinking and bool(self._start) and bool(self._ends)
        end = self._ends[0] if self._ends else ""
        self._end_tokens = self._vocab.tokenize(end, add_special=False, parse_special=True) if end else []
        # Templates that open the block themselves (DeepSeek R1's "<think>\n") start the reply inside it.
        self._state = "thinking" if self._active and rendered.generation_prompt.rstrip().endswith(self._start) \
            else "before"
        self._seen: int | None = None
        self._text = b""
        self._count = 0
        self._forcing: list[int] = []

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if not self._active:
            return scores
        if self._seen is None:
            self._seen = len(input_ids)
        for token in input_ids[self._seen:]:
            self._follow(int(token))
        self._seen = len(input_ids)
        if not self._forcing and self._state == "thinking" and self._count >= self._budget:
            self._forcing = list(self._end_tokens)
            self._state = "closing"
        if self._forcing:
            forced = np.full_like(scores, -np.inf)
            forced[self._forcing.pop(0)] = 0.0
            return forced
        return scores

    def _follow(self, token: int) -> None:
        if self._state == "thinking":
            self._count += 1
        self._text += self._vocab.piece(token, special=True)
        text = self._text.decode("utf-8", errors="ignore")
        if self._state == "before" and self._start in text:
            self._state, self._text, self._count = "thinking", b"", 0
        elif self._state in ("thinking", "closing") and any(end in text for end in self._ends):
            self._state = "done"
            self._forcing = []
        self._text = self._text[-256:]  # a tag is short: the tail is enough to find one that spans tokens


def _regex_escape(text: str) -> str:
    """Escape for std::regex ECMAScript, as common's regex_escape does."""
    return "".join("\\" + ch if ch in ".^$|()*+?[]{}\\" else ch for ch in text)
