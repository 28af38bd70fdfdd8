"""create_chat_completion for llmplace.Llama: render the messages with the chat template (llmplace.chat's
format_chat), complete, and reshape the `text_completion` result into `chat.completion` dicts or
`chat.completion.chunk` streams exactly as llama-cpp-python 0.3.36 does."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..chat import format_chat
from ..chat_template import check_message_list
from .errors import CompatibilityWarning, UnsupportedFeatureError
from .llama_grammar import JSON_GBNF, LlamaGrammar

if TYPE_CHECKING:
    from .llama import Llama

# llama-cpp-python's chat_format names → the template names llmplace's format_chat knows.
CHAT_FORMAT_NAMES = {
    "llama-2": "llama2", "llama-3": "llama3", "chatml": "chatml", "mistral-instruct": "mistral-v1",
    "gemma": "gemma", "zephyr": "zephyr", "vicuna": "vicuna", "openchat": "openchat", "phi-3": "phi3",
    "qwen": "chatml", "chatglm3": "chatglm3", "mistrallite": "mistral-v1",
}


# llama-cpp-python's formats that are programs (function calling, vision), not templates.
UNSUPPORTED_FORMATS = {"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2", "llava-1-5",
                       "llava-1-6", "moondream2", "nanollava", "llama-3-vision-alpha", "minicpm-v-2.6", "qwen2.5-vl"}


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
                else:
                    raise UnsupportedFeatureError(f"message {i} has a {part.get('type') if isinstance(part, dict) else type(part).__name__!r} "
                                                  "content part: llmplace.Llama takes text only (no images yet)")
            content = "".join(texts)
        out.append({**message, "content": content})
    return out


def render(llama: Llama, messages) -> list[int]:
    """The prompt tokens for `messages` with the Llama's chat format (the model's own template by default)."""
    model = llama._model
    fmt = llama.chat_format
    if fmt in UNSUPPORTED_FORMATS:
        raise UnsupportedFeatureError(f"chat_format={fmt!r} (function calling or vision in llama-cpp-python) is not "
                                      "supported by llmplace.Llama yet; use the model's own template (chat_format=None)")
    template = None if fmt in (None, "chat_template.default") else CHAT_FORMAT_NAMES.get(fmt, fmt)
    text = format_chat(model, [{"role": m.get("role"), "content": m["content"]} for m in _plain_messages(messages)],
                       add_generation_prompt=True, template=template)
    vocab = model.vocab
    tokens = vocab.tokenize(text, add_special=False, parse_special=True)
    # Templates written for Hugging Face write BOS into the text themselves; llama.cpp's engine never does.
    bos = vocab.bos
    if vocab.add_bos and bos is not None and not text.startswith(vocab.token_text(bos)):
        tokens.insert(0, bos)
    return tokens


def create(llama: Llama, *, messages, functions, function_call, tools, tool_choice, temperature, top_p, top_k,
           min_p, typical_p, stream, stop, seed, response_format, max_tokens, presence_penalty, frequency_penalty,
           repeat_penalty, tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, model, logits_processor, grammar,
           logit_bias, logprobs, top_logprobs):
    grammar = json_grammar(response_format, grammar)
    if isinstance(tool_choice, dict) or isinstance(function_call, dict):
        raise UnsupportedFeatureError("forcing a tool or function call (tool_choice / function_call naming one) "
                                      "needs grammar-constrained sampling, which is not supported by llmplace.Llama yet")
    tokens = render(llama, messages)
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    eos = llama._model.vocab.eos
    if eos is not None:
        stops.append(llama._model.vocab.token_text(eos))  # as llama-cpp-python's Jinja2 chat formatter
    completion = llama.create_completion(
        prompt=tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
        logprobs=top_logprobs if logprobs else None, stream=stream, stop=stops, seed=seed, max_tokens=max_tokens,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
        tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
        logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
    if stream:
        return chat_chunks(completion)
    return chat_completion(completion)


def json_grammar(response_format, grammar):
    """The grammar for response_format={"type": "json_object"} (any JSON object), else `grammar` unchanged."""
    if response_format is None or response_format.get("type") != "json_object":
        return grammar
    if "schema" in response_format:
        warnings.warn("response_format's schema is not enforced by llmplace.Llama yet: the reply is constrained to "
                      "a JSON object, not to the schema", CompatibilityWarning, stacklevel=4)
    return LlamaGrammar.from_string(JSON_GBNF)


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
