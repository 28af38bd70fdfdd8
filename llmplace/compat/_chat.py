"""create_chat_completion for llmplace.Llama: render the messages with the chat template (llmplace.chat's
format_chat), complete, and reshape the `text_completion` result into `chat.completion` dicts or
`chat.completion.chunk` streams exactly as llama-cpp-python 0.3.36 does.

response_format {"type": "json_object"} (optionally with "schema") and {"type": "json_schema", "json_schema":
{"schema": ...}} constrain the reply with a grammar (llama.cpp's schema converter, llama_grammar). A forced
tool call (tool_choice={"type": "function", "function": {"name": N}}, or the legacy functions +
function_call={"name": N}) constrains the reply to N's `parameters` schema and returns it as the message's
tool_calls / function_call, as llama-cpp-python's default chat handler does.

Tools the model chooses itself (tool_choice "auto" / "required" on a template that describes tools) and the
reasoning_content of models that think are answered by llama.cpp's chat layer instead: _chat_tools.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..chat import format_chat
from ..chat_template import check_message_list
from ..errors import InvalidParameterError, NoProjectorError
from ._chat_tools import FUNCTIONARY_FORMATS, check_functionary, tools_request
from .errors import UnsupportedFeatureError
from .llama_grammar import JSON_GBNF, LlamaGrammar

if TYPE_CHECKING:
    from .llama import Llama

# llama-cpp-python's chat_format names → the template names llmplace's format_chat knows.
CHAT_FORMAT_NAMES = {
    "llama-2": "llama2", "llama-3": "llama3", "chatml": "chatml", "mistral-instruct": "mistral-v1",
    "gemma": "gemma", "zephyr": "zephyr", "vicuna": "vicuna", "openchat": "openchat", "phi-3": "phi3",
    "qwen": "chatml", "chatglm3": "chatglm3", "mistrallite": "mistral-v1",
    # without tools (or with tool_choice "none") llama-cpp-python's handler renders plain ChatML too
    "chatml-function-calling": "chatml",
}


# llama-cpp-python's formats that are programs (function calling, vision), not templates, and that llmplace does
# not map: "functionary" renders functionary-7b-v1's 2023 prompt (no template describes it, no parser reads it).
# "chatml-function-calling" and "functionary-v1"/"-v2" map onto llama.cpp's chat layer (_chat_tools.py).
UNSUPPORTED_FORMATS = {"functionary", "llava-1-5", "llava-1-6", "moondream2", "nanollava", "llama-3-vision-alpha",
                       "minicpm-v-2.6", "qwen2.5-vl"}


def _plain_messages(messages) -> list[dict]:
    """Messages as {'role', 'content': str}: None content becomes "", text parts are joined. The shape is
    checked as everywhere in llmplace (chat_template.check_message_list); roles and contents then by
    format_chat."""
    check_message_list(messages)
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "image_url":
                    raise NoProjectorError(
                        f"message {i} has an image but no projector (mmproj) is loaded for the model: create the "
                        "Llama with chat_handler=MTMDChatHandler(clip_model_path='mmproj.gguf') (llama_chat_format)")
                else:
                    kind = part.get('type') if isinstance(part, dict) else type(part).__name__
                    raise UnsupportedFeatureError(f"message {i} has a {kind!r} "
                                                  "content part: llmplace.Llama takes text and image_url parts")
            content = "".join(texts)
        out.append({**message, "content": content})
    return out


def prompt_tokens(model, text: str) -> list[int]:
    """A rendered chat prompt as tokens: special tokens parsed, BOS added when the model wants one and the
    template did not write it (templates written for Hugging Face write BOS themselves; llama.cpp never does)."""
    vocab = model.vocab
    tokens = vocab.tokenize(text, add_special=False, parse_special=True)
    bos = vocab.bos
    if vocab.add_bos and bos is not None and not text.startswith(vocab.token_text(bos)):
        tokens.insert(0, bos)
    return tokens


def render(llama: Llama, messages, chat_format: str | None = None) -> list[int]:
    """The prompt tokens for `messages` with the Llama's chat format (the model's own template by default), or
    with `chat_format`."""
    model = llama._model
    fmt = llama.chat_format if chat_format is None else chat_format
    if fmt in UNSUPPORTED_FORMATS:
        raise UnsupportedFeatureError(f"chat_format={fmt!r} (function calling or vision in llama-cpp-python) is not "
                                      "supported by llmplace.Llama; use the model's own template "
                                      "(chat_format=None), whose tool calls llama.cpp's chat layer reads")
    own = (None, "chat_template.default", *FUNCTIONARY_FORMATS)
    template = None if fmt in own else CHAT_FORMAT_NAMES.get(fmt, fmt)
    plain: list[dict[str, Any]] = [{"role": m.get("role"), "content": m["content"]} for m in _plain_messages(messages)]
    text = format_chat(model, plain, add_generation_prompt=True, template=template)  # roles are checked there
    return prompt_tokens(model, text)


def create(llama: Llama, *, messages, functions, function_call, tools, tool_choice, temperature, top_p, top_k,
           min_p, typical_p, stream, stop, seed, response_format, max_tokens, presence_penalty, frequency_penalty,
           repeat_penalty, tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, model, logits_processor, grammar,
           logit_bias, logprobs, top_logprobs, reasoning_format=None, chat_template_kwargs=None,
           parallel_tool_calls=None, reasoning_budget_tokens=None, chat_format=None):
    """create_chat_completion. chat_format: answer with this format instead of the Llama's (the handler
    functions of llama_chat_format, such as chatml_function_calling, pass theirs)."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                    logprobs=top_logprobs if logprobs else None, stream=stream, seed=seed, max_tokens=max_tokens,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                    mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                    logits_processor=logits_processor, logit_bias=logit_bias)
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    check_functionary(llama, llama.chat_format if chat_format is None else chat_format)
    native = tools_request(llama, messages, functions=functions, function_call=function_call, tools=tools,
                           tool_choice=tool_choice, grammar=grammar, response_format=response_format,
                           reasoning_format=reasoning_format, chat_template_kwargs=chat_template_kwargs,
                           parallel_tool_calls=parallel_tool_calls, reasoning_budget_tokens=reasoning_budget_tokens,
                           chat_format=chat_format)
    if native is not None:
        return native.complete(llama, stops, stream, sampling)
    grammar = json_grammar(response_format, grammar)
    tool = forced_tool(functions, function_call, tools, tool_choice)
    if tool is not None:
        grammar = tool_grammar(tool)
    tokens = render(llama, messages, chat_format)
    eos = llama._model.vocab.eos
    if eos is not None:
        stops.append(llama._model.vocab.token_text(eos))  # as llama-cpp-python's Jinja2 chat formatter
    completion = llama.create_completion(
        prompt=tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
        logprobs=top_logprobs if logprobs else None, stream=stream, stop=stops, seed=seed, max_tokens=max_tokens,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
        tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
        logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
    return reshape(completion, stream, tool)


def reshape(completion, stream: bool, tool: dict | None):
    """The text completion (or its chunks) as a chat completion: a tool call when a tool was forced."""
    if tool is not None:
        name = tool["name"]
        return tool_call_chunks(name, completion) if stream else tool_call_completion(name, completion)
    return chat_chunks(completion) if stream else chat_completion(completion)


def json_grammar(response_format, grammar):
    """The grammar response_format asks for: {"type": "json_object"} any JSON object, or the JSON its "schema"
    describes; {"type": "json_schema", "json_schema": {"schema": ...}} that schema. Otherwise `grammar`
    unchanged. A schema llama.cpp's converter refuses raises JsonSchemaError (a ValueError)."""
    if response_format is None:
        return grammar
    if not isinstance(response_format, dict):
        raise InvalidParameterError(f"response_format must be a dict such as {{'type': 'json_object'}}, not "
                                    f"{type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidParameterError("response_format of type 'json_schema' needs 'json_schema': "
                                        "{'name': ..., 'schema': {...}}")
        schema = spec.get("schema")
    else:
        return grammar
    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF)
    return LlamaGrammar.from_json_schema(json.dumps(schema) if not isinstance(schema, str) else schema)


def forced_tool(functions, function_call, tools, tool_choice) -> dict | None:
    """The function a call forces ({"name", "parameters"}), or None. As llama-cpp-python: `functions` stand
    for tools, and function_call={"name": N} for tool_choice naming N; "auto" / "none" / "required" force
    nothing (the reply is plain text)."""
    if functions is not None:
        tools = [{"type": "function", "function": function} for function in functions]
    if isinstance(function_call, dict):
        if not isinstance(function_call.get("name"), str):
            raise InvalidParameterError("function_call must be 'auto', 'none' or {'name': <function name>}")
        tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    elif function_call is not None:
        tool_choice = function_call
    if not isinstance(tool_choice, dict):
        return None
    chosen = tool_choice.get("function")
    name = chosen.get("name") if isinstance(chosen, dict) else None
    if not isinstance(name, str):
        raise InvalidParameterError("tool_choice must be 'auto', 'none' or {'type': 'function', 'function': "
                                    "{'name': <function name>}}")
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            return {"name": name, "parameters": {"type": "object"} if parameters is None else parameters}
    raise InvalidParameterError(f"Tool choice '{name}' not found in tools.")


def tool_grammar(tool: dict) -> LlamaGrammar:
    """The grammar of the forced function's arguments: JSON valid against its `parameters` schema."""
    try:
        return LlamaGrammar.from_json_schema(json.dumps(tool["parameters"]))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"function {tool['name']!r}: its parameters are not a usable JSON schema: {exc}") from None


def chat_logprobs(logprobs):
    """CompletionLogprobs → ChatCompletionLogprobs."""
    if logprobs is None:
        return None
    return {"content": [{"token": token, "bytes": None, "logprob": logprob,
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]}
                        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                       logprobs["top_logprobs"])],
            "refusal": None}


def chat_completion(completion: dict) -> dict:
    choice = completion["choices"][0]
    return {"id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                         "logprobs": chat_logprobs(choice["logprobs"]), "finish_reason": choice["finish_reason"]}],
            "usage": completion["usage"]}


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    first = True
    for chunk in chunks:
        cid, model, created = "chat" + chunk["id"], chunk["model"], chunk["created"]
        if first:  # the role comes alone in the first chunk, as OpenAI streams it
            first = False
            yield {"id": cid, "model": model, "created": created, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
        choice = chunk["choices"][0]
        finish = choice["finish_reason"]
        yield {"id": cid, "model": model, "created": created, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": choice["text"]} if finish is None else {},
                            "logprobs": chat_logprobs(choice["logprobs"]), "finish_reason": finish}]}


def _call_id(name: str, completion_id: str) -> str:
    return f"call__0_{name}_{completion_id}"  # llama-cpp-python's tool call ids


def tool_call_completion(name: str, completion: dict) -> dict:
    """A forced call's completion as a chat.completion whose message holds the call (tool_calls and the
    legacy function_call, both as llama-cpp-python fills them) and no content. finish_reason is "tool_calls",
    or "length" when max_tokens cut the arguments short (llama-cpp-python says "tool_calls" then too)."""
    choice = completion["choices"][0]
    arguments = choice["text"]
    finish = "length" if choice["finish_reason"] == "length" else "tool_calls"
    message = {"role": "assistant", "content": None, "function_call": {"name": name, "arguments": arguments},
               "tool_calls": [{"id": _call_id(name, completion["id"]), "type": "function",
                               "function": {"name": name, "arguments": arguments}}]}
    return {"id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"],
            "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(choice["logprobs"]),
                         "finish_reason": finish}],
            "usage": completion["usage"]}


def tool_call_chunks(name: str, chunks: Iterator[dict]) -> Iterator[dict]:
    """A forced call streamed: a first chunk with the role, then one delta per piece of the arguments (each
    with tool_calls [{"index": 0, "id", "type", "function": {"name", "arguments": piece}}] and the legacy
    function_call), then an empty delta with finish_reason "tool_calls" (or "length")."""
    cid = created = model = call_id = None
    finish = "tool_calls"
    for chunk in chunks:
        choice = chunk["choices"][0]
        if cid is None:
            cid, created, model = "chat" + chunk["id"], chunk["created"], chunk["model"]
            call_id = _call_id(name, chunk["id"])
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                "delta": {"role": "assistant", "content": None, "function_call": None,
                                          "tool_calls": None}}]}
        if choice["finish_reason"] is not None:
            finish = "length" if choice["finish_reason"] == "length" else "tool_calls"
        text = choice["text"]
        if not text:
            continue
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "finish_reason": None, "logprobs": chat_logprobs(choice["logprobs"]),
                            "delta": {"role": None, "content": None,
                                      "function_call": {"name": name, "arguments": text},
                                      "tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                      "function": {"name": name, "arguments": text}}]}}]}
    if cid is not None:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                            "delta": {"role": None, "content": None, "function_call": None, "tool_calls": None}}]}
