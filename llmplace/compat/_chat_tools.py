"""Tool calls the model chooses itself, and reasoning, in Llama.create_chat_completion (llmplace.chat_tools).

When the model's own template describes tools, llama.cpp's chat layer renders `tools`, builds the call's grammar
(lazy for tool_choice "auto": free text until the family's trigger; forced for "required" or a named function)
and parses the reply into message.tool_calls and message.reasoning_content, whole or as stream deltas. When the
template cannot describe tools (SmolLM2's, for one), tool_choice "required" still forces a call: the tools are
described in a system message and the reply is constrained to {"name": ..., "arguments": ...} (llama.cpp's old
"generic" format); "auto" and a named function keep llama-cpp-python's behaviour (plain text; the function's
arguments). Models that think get reasoning_content even without tools, unless reasoning_format="none".

llama-cpp-python's function-calling chat formats map onto the same path: chat_format="chatml-function-calling"
renders ChatML with the tools described in a system turn (CHATML_FUNCTION_CALLING), "functionary-v1" and
"functionary-v2" the GGUF's own template (the functionary model's, which llama-cpp-python reads through a Hugging
Face tokenizer), when llama.cpp's chat layer reads tool calls from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..chat_template import check_message_list
from ..chat_tools import (
    REASONING_FORMATS,
    ChatTemplates,
    ParsedReply,
    RenderedChat,
    ReplyParser,
    ReplyStream,
    ToolCall,
    ToolCallGrammar,
    ToolCallParseError,
    ThinkingBudget,
    check_tools,
    new_call_id,
)
from ..errors import InvalidParameterError, TemplateError
from .errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from .llama import Llama

_OWN_TEMPLATE = (None, "chat_template.default")
# llama-cpp-python's functionary v1/v2 handlers render with the model's own template (through its Hugging Face
# tokenizer): here the GGUF's template, read by llama.cpp's chat layer.
FUNCTIONARY_FORMATS = ("functionary-v1", "functionary-v2")
CHATML_FUNCTION_CALLING_FORMAT = "chatml-function-calling"

# chat_format="chatml-function-calling": ChatML, the tools listed in a system turn, and calls written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call> (Hermes 2 Pro's convention, which ChatML models with
# tool training write and llama.cpp's chat layer reads), with tool results in "tool" turns. llama-cpp-python's
# handler asks for "functions.<name>:" lines of its own instead, which no model was trained on and which
# llama.cpp's chat layer does not read.
CHATML_FUNCTION_CALLING = """\
{%- set first_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
<|im_start|>system
{% if first_system %}{{ messages[0].content }}

{% endif %}You can call functions. Their names, descriptions and JSON schemas of arguments:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call a function, answer with a JSON object of its name and arguments inside <tool_call></tool_call>:
<tool_call>
{"name": <function name>, "arguments": <arguments as a JSON object>}
</tool_call><|im_end|>
{% elif first_system -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' and loop.first -%}
{%- elif message.role == 'assistant' and message.tool_calls -%}
<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


class _TemplateTraits:
    """What the model's own template can do in llama.cpp's chat layer, found once per Llama."""

    def __init__(self, templates: ChatTemplates, supports_tool_calls: bool, supports_thinking: bool) -> None:
        self.templates = templates
        self.supports_tool_calls = supports_tool_calls
        self.supports_thinking = supports_thinking


def template_traits(llama: Llama, chat_format: str | None = None) -> _TemplateTraits | None:
    """None when llama.cpp's chat layer cannot read the model's template (the Jinja path still renders it).
    chat_format "chatml-function-calling": CHATML_FUNCTION_CALLING's traits instead."""
    chatml = chat_format == CHATML_FUNCTION_CALLING_FORMAT
    key = "_llmplace_chatml_tools_traits" if chatml else "_llmplace_template_traits"
    cached = llama.__dict__.get(key, False)
    if cached is not False:
        return cached
    traits = None
    try:
        templates = (ChatTemplates(template=CHATML_FUNCTION_CALLING, eos_token="<|im_end|>") if chatml
                     else ChatTemplates(llama._model))
        probe = templates.render([{"role": "user", "content": "Hi"}], reasoning_format="auto")
        traits = _TemplateTraits(templates, bool(probe.caps.get("supports_tool_calls")), probe.supports_thinking)
    except (TemplateError, InvalidParameterError):
        traits = None
    llama.__dict__[key] = traits
    return traits


def check_functionary(llama: Llama, chat_format: str | None) -> None:
    """chat_format "functionary-v1" / "functionary-v2" need a GGUF whose own template llama.cpp's chat layer
    reads tool calls from (functionary v3.1 and v3.2 are such templates)."""
    if chat_format not in FUNCTIONARY_FORMATS:
        return
    traits = template_traits(llama)
    if traits is None or not traits.supports_tool_calls:
        raise UnsupportedFeatureError(
            f"chat_format={chat_format!r} renders the model's own template and reads its tool calls with llama.cpp's "
            f"chat layer, which finds no tool calls in the template of {llama.model_path!r}: llama-cpp-python "
            "reads functionary's format through a Hugging Face tokenizer (hf_tokenizer_path), which llmplace does "
            "not use; use a functionary GGUF whose template llama.cpp knows (v3.1, v3.2)")


def tools_request(llama: Llama, messages, *, functions, function_call, tools, tool_choice, grammar,
                  response_format, reasoning_format, chat_template_kwargs, parallel_tool_calls,
                  reasoning_budget_tokens=None, chat_format=None):
    """The chat request when it is llama.cpp's chat layer's to answer (a _NativeChat or a _GenericToolChat),
    else None: the caller renders and answers it as llama-cpp-python does. chat_format: the format to answer
    with (default the Llama's)."""
    reasoning = llama.reasoning_format if reasoning_format is None else reasoning_format
    if reasoning not in REASONING_FORMATS:
        raise InvalidParameterError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, not "
                                    f"{reasoning!r}")
    if reasoning_budget_tokens is not None and (isinstance(reasoning_budget_tokens, bool) or not isinstance(
            reasoning_budget_tokens, int) or reasoning_budget_tokens < -1):
        raise InvalidParameterError(f"reasoning_budget_tokens must be a number of tokens >= 0, or -1 for no limit, "
                                    f"not {reasoning_budget_tokens!r}")
    budget = None if reasoning_budget_tokens in (None, -1) else reasoning_budget_tokens
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise InvalidParameterError("chat_template_kwargs must be a dict such as {'enable_thinking': False}")
    fmt = llama.chat_format if chat_format is None else chat_format
    if fmt not in (*_OWN_TEMPLATE, *FUNCTIONARY_FORMATS, CHATML_FUNCTION_CALLING_FORMAT) or grammar is not None \
            or response_format is not None:
        return None
    legacy = functions is not None
    if legacy:
        tools = [{"type": "function", "function": function} for function in functions]
    if isinstance(function_call, dict):
        tool_choice = {"type": "function", "function": {"name": function_call.get("name")}}
    elif function_call is not None:
        tool_choice = function_call
    traits = template_traits(llama, fmt)
    if traits is None:
        return None
    forcing = isinstance(tool_choice, dict) or tool_choice == "required"
    wants_call = bool(tools) and tool_choice != "none"
    def native(described, choice) -> _NativeChat:
        return _NativeChat(traits.templates, messages, described, choice, reasoning_format=reasoning,
                           chat_template_kwargs=chat_template_kwargs, parallel_tool_calls=bool(parallel_tool_calls),
                           legacy_function_call=legacy, reasoning_budget=budget)

    if wants_call and traits.supports_tool_calls:
        return native(tools, tool_choice)
    if wants_call and tool_choice == "required":
        return _GenericToolChat(messages, check_tools(tools), bool(parallel_tool_calls), legacy)
    thinking_asked = "enable_thinking" in (chat_template_kwargs or {}) or budget is not None
    if traits.supports_thinking and not (wants_call and forcing) and (reasoning != "none" or thinking_asked):
        described = tools if traits.supports_tool_calls else None
        return native(described, "none" if described else "auto")
    return None


def _stops(llama: Llama, stops: list[str], extra=()) -> list[str]:
    stops = list(stops)
    eos = llama._model.vocab.eos
    if eos is not None:
        stops.append(llama._model.vocab.token_text(eos))
    stops.extend(s for s in extra if s not in stops)
    return stops


def _message(reply: ParsedReply, legacy_function_call: bool) -> dict[str, Any]:
    calls = [call.to_openai() for call in reply.tool_calls]
    message: dict[str, Any] = {"role": "assistant", "content": reply.content if reply.content or not calls else None}
    if reply.reasoning_content:
        message["reasoning_content"] = reply.reasoning_content
    if calls:
        message["tool_calls"] = calls
        if legacy_function_call:
            message["function_call"] = dict(calls[0]["function"])
    return message


def _finish_reason(reply: ParsedReply, finish: str | None) -> str | None:
    return "tool_calls" if reply.tool_calls and finish != "length" else finish


def _completion_dict(completion: dict, message: dict, finish: str | None) -> dict:
    from ._chat import chat_logprobs

    choice = completion["choices"][0]
    return {"id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"],
            "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(choice["logprobs"]),
                         "finish_reason": finish}],
            "usage": completion["usage"]}


def _chunk(head: dict, delta: dict, finish: str | None = None, logprobs=None) -> dict:
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


class _NativeChat:
    """A request llama.cpp's chat layer renders and parses (the template describes tools, or the model thinks)."""

    def __init__(self, templates: ChatTemplates, messages, tools, tool_choice, *, reasoning_format: str,
                 chat_template_kwargs: dict | None, parallel_tool_calls: bool, legacy_function_call: bool,
                 reasoning_budget: int | None = None) -> None:
        check_message_list(messages)
        kwargs = dict(chat_template_kwargs or {})
        enable_thinking = kwargs.get("enable_thinking", True)
        if not isinstance(enable_thinking, bool):
            raise InvalidParameterError("chat_template_kwargs['enable_thinking'] must be True or False")
        self.reasoning_format = reasoning_format
        self.legacy_function_call = legacy_function_call
        self.reasoning_budget = reasoning_budget
        self.rendered: RenderedChat = templates.render(
            [dict(m) for m in messages], tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls, reasoning_format=reasoning_format,
            enable_thinking=enable_thinking, chat_template_kwargs=kwargs)

    def complete(self, llama: Llama, stops: list[str], stream: bool, sampling: dict):
        from ._chat import prompt_tokens

        rendered = self.rendered
        model = llama._model
        grammar = ToolCallGrammar(model, rendered) if rendered.grammar else None
        if self.reasoning_budget is not None and rendered.supports_thinking:
            from .llama import LogitsProcessorList

            # after the caller's processors: the forced end tag wins
            sampling = {**sampling, "logits_processor": LogitsProcessorList(
                [*(sampling.get("logits_processor") or []), ThinkingBudget(model, rendered, self.reasoning_budget)])}
        # deepseek-legacy: thinking split out of whole replies, but left inline in stream deltas
        parser = rendered.reply_parser(reasoning_in_content=stream and self.reasoning_format == "deepseek-legacy")
        completion: Any = llama.create_completion(prompt=prompt_tokens(model, rendered.prompt), grammar=grammar,
                                             stop=_stops(llama, stops, rendered.additional_stops), **sampling)
        if stream:
            return self._chunks(parser, completion)
        with parser:
            choice = completion["choices"][0]
            finish = choice["finish_reason"]
            reply = ReplyStream(parser).with_ids(parser.parse(choice["text"], partial=finish == "length"))
        return _completion_dict(completion, _message(reply, self.legacy_function_call),
                                _finish_reason(reply, finish))

    def _chunks(self, parser: ReplyParser, completion: Iterator[dict]) -> Iterator[dict]:
        from ._chat import chat_logprobs

        with parser:
            stream = ReplyStream(parser)
            head = None
            finish = None
            for chunk in completion:
                if head is None:
                    head = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                            "object": "chat.completion.chunk"}
                    yield _chunk(head, {"role": "assistant"})  # the role alone first, as OpenAI streams it
                choice = chunk["choices"][0]
                finish = choice["finish_reason"] or finish
                logprobs = chat_logprobs(choice["logprobs"])
                for delta in stream.feed(choice["text"]):
                    yield _chunk(head, delta, logprobs=logprobs)
                    logprobs = None  # a piece's logprobs go with the first delta it made
            if head is None:
                return
            reply, deltas = stream.finish(partial=finish == "length")
            for delta in deltas:
                yield _chunk(head, delta)
            yield _chunk(head, {}, _finish_reason(reply, finish))


_GENERIC_NOTE = ("You can call these tools (JSON schemas of their arguments):\n{tools}\n"
                 "Answer with one JSON object {{\"name\": <tool name>, \"arguments\": <its arguments>}}{many}.")


class _GenericToolChat:
    """tool_choice "required" with a template that cannot describe tools: the tools go into a system message and
    the reply is constrained to {"name": ..., "arguments": ...} (a list of them with parallel_tool_calls)."""

    def __init__(self, messages, tools: list[dict] | None, parallel: bool, legacy_function_call: bool) -> None:
        check_message_list(messages)
        self.tools = tools or []
        self.parallel = parallel
        self.legacy_function_call = legacy_function_call
        functions = [tool["function"] for tool in self.tools]
        described = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if k in f}
                                for f in functions])
        note = _GENERIC_NOTE.format(tools=described, many=", or a JSON list of them" if parallel else "")
        messages = [dict(m) for m in messages]
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            messages[0]["content"] = messages[0]["content"] + "\n\n" + note
        else:
            messages.insert(0, {"role": "system", "content": note})
        self.messages = messages
        call = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"]} for f in functions]}
        self.schema = {"type": "array", "items": call, "minItems": 1} if parallel else call

    def complete(self, llama: Llama, stops: list[str], stream: bool, sampling: dict):
        from ._chat import render
        from .llama_grammar import JsonSchemaError, LlamaGrammar

        names = ", ".join(repr(t["function"]["name"]) for t in self.tools)
        try:
            grammar = LlamaGrammar.from_json_schema(json.dumps(self.schema))
        except (TypeError, ValueError) as exc:
            raise JsonSchemaError(f"the tools {names}: their parameters are not a usable JSON schema: {exc}") from None
        completion: Any = llama.create_completion(prompt=render(llama, self.messages), grammar=grammar,
                                             stop=_stops(llama, stops), **sampling)
        if stream:
            return self._chunks(completion)
        choice = completion["choices"][0]
        reply = self.parse(choice["text"], choice["finish_reason"])
        return _completion_dict(completion, _message(reply, self.legacy_function_call),
                                _finish_reason(reply, choice["finish_reason"]))

    def parse(self, text: str, finish: str | None) -> ParsedReply:
        try:
            value = json.loads(text)
        except ValueError as exc:
            if finish == "length":  # cut short by max_tokens: what was written stays content
                return ParsedReply(text)
            raise ToolCallParseError(f"the model's forced tool call is not JSON ({exc}): {text[:200]!r}") from None
        calls = value if isinstance(value, list) else [value]
        return ParsedReply("", "", tuple(ToolCall(c["name"], json.dumps(c["arguments"]), new_call_id())
                                         for c in calls))

    def _chunks(self, completion: Iterator[dict]) -> Iterator[dict]:
        # The call is sent whole once it is complete: its JSON cannot be cut into name and arguments earlier.
        head = None
        text, finish = "", None
        for chunk in completion:
            if head is None:
                head = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                        "object": "chat.completion.chunk"}
                yield _chunk(head, {"role": "assistant"})
            choice = chunk["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
        if head is None:
            return
        reply = self.parse(text, finish)
        if reply.content:
            yield _chunk(head, {"content": reply.content})
        for index, call in enumerate(reply.tool_calls):
            yield _chunk(head, {"tool_calls": [{"index": index, **call.to_openai()}]})
        yield _chunk(head, {}, _finish_reason(reply, finish))

