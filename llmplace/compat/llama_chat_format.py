"""llama-cpp-python's `llama_cpp.llama_chat_format`: chat formatters, the handler registry, and
`Jinja2ChatFormatter`, for code that brings its own chat format to `Llama(chat_format=..., chat_handler=...)`.

The named formats llama-cpp-python defines in Python ("llama-2", "chatml", "gemma" ...) are not registered
here: `Llama(chat_format="chatml")` renders with llmplace's templates of the same names instead (see
llmplace/compat/_chat.py). A name registered here with `register_chat_format` takes precedence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from typing import Any, Protocol

from .. import jinja_limits
from ..errors import TemplateError
from . import _chat
from .verbosity import suppress_stdout_stderr  # noqa: F401 - llama-cpp-python's module exports it too

# llama-cpp-python's module exposes its logger here; llmplace's messages go to the "llmplace" logger
logger = logging.getLogger("llmplace")


@dataclasses.dataclass
class ChatFormatterResponse:
    """A rendered prompt, and the stop strings (and stopping criteria) the format needs."""

    prompt: str
    stop: str | list[str] | None = None
    stopping_criteria: Any | None = None
    added_special: bool = False  # True when the prompt text already holds BOS: do not add another


class ChatFormatter(Protocol):
    def __call__(self, *, messages: list[dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse: ...


class LlamaChatCompletionHandler(Protocol):
    """A chat handler: called with the Llama and the request's keywords (messages, tools, temperature ...), it
    returns a chat completion dict, or an iterator of chunks when stream=True."""

    def __call__(self, *, llama: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any: ...


class LlamaChatCompletionHandlerNotFoundException(Exception):
    """No chat handler is registered under that name."""


class LlamaChatCompletionHandlerRegistry:
    """Name → chat completion handler (one registry per process, as in llama-cpp-python)."""

    _chat_handlers: dict[str, LlamaChatCompletionHandler] = {}

    def register_chat_completion_handler(self, name: str, chat_handler: LlamaChatCompletionHandler,
                                         overwrite: bool = False) -> None:
        if not overwrite and name in self._chat_handlers:
            raise ValueError(f"Formatter with name '{name}' is already registered. "
                             "Use `overwrite=True` to overwrite it.")
        self._chat_handlers[name] = chat_handler

    def unregister_chat_handler(self, name: str) -> None:
        if name not in self._chat_handlers:
            raise ValueError(f"No formatter registered under the name '{name}'.")
        del self._chat_handlers[name]

    def get_chat_completion_handler_by_name(self, name: str) -> LlamaChatCompletionHandler:
        try:
            return self._chat_handlers[name]
        except KeyError:
            raise LlamaChatCompletionHandlerNotFoundException(
                f"Invalid chat handler: {name} (valid formats: {list(self._chat_handlers.keys())})") from None


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    return LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)


def registered_handler(name: str | None) -> LlamaChatCompletionHandler | None:
    """The handler registered under `name`, or None (llmplace then renders with its own templates)."""
    return LlamaChatCompletionHandlerRegistry._chat_handlers.get(name) if name else None


def register_chat_completion_handler(name: str):
    def decorator(f: LlamaChatCompletionHandler):
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, f)
        return f
    return decorator


def register_chat_format(name: str):
    """Decorator: register a formatter (messages → ChatFormatterResponse) as chat format `name`."""
    def decorator(f: ChatFormatter):
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
            name, chat_formatter_to_chat_completion_handler(f))
        return f
    return decorator


def chat_formatter_to_chat_completion_handler(chat_formatter: ChatFormatter) -> LlamaChatCompletionHandler:
    """A chat handler that renders with `chat_formatter`, completes with llama.create_completion and returns
    chat.completion dicts (or chunk streams)."""

    def chat_completion_handler(*, llama, messages, functions=None, function_call=None, tools=None,
                                tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                                min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=[],  # noqa: B006
                                seed=None, response_format=None, max_tokens=None, presence_penalty: float = 0.0,
                                frequency_penalty: float = 0.0, repeat_penalty: float = 1.1, tfs_z: float = 1.0,
                                mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                                model=None, logits_processor=None, grammar=None, logit_bias=None, logprobs=None,
                                top_logprobs=None, **kwargs):
        grammar = _chat.json_grammar(response_format, grammar)
        tool = _chat.forced_tool(functions, function_call, tools, tool_choice)
        if tool is not None:  # the arguments are constrained to the function's parameters schema
            grammar = _chat.tool_grammar(tool)
        result = chat_formatter(messages=messages, functions=functions, function_call=function_call, tools=tools,
                                tool_choice=tool_choice, **kwargs)
        prompt = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        if result.stop is not None:
            stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
            stop = stop + (result.stop if isinstance(result.stop, list) else [result.stop])
        completion = llama.create_completion(
            prompt=prompt, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            logprobs=top_logprobs if logprobs else None, stream=stream, stop=stop, seed=seed, max_tokens=max_tokens,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, logits_processor=logits_processor, stopping_criteria=result.stopping_criteria,
            grammar=grammar, logit_bias=logit_bias)
        return _chat.reshape(completion, stream, tool)

    return chat_completion_handler


# llama-cpp-python's function-calling handlers, as functions taking its keywords: each answers through
# llama.cpp's chat layer (llmplace/compat/_chat_tools.py), as Llama(chat_format=<its name>) does. Upstream's
# signatures, mutable defaults included (stop=[]: never mutated here).
def chatml_function_calling(llama, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                            temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                            typical_p: float = 1.0, stream: bool = False, stop=[],  # noqa: B006
                            response_format=None, max_tokens=None, presence_penalty: float = 0.0,
                            frequency_penalty: float = 0.0, repeat_penalty: float = 1.1, tfs_z: float = 1.0,
                            mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                            model=None, logits_processor=None, grammar=None, logprobs=None, top_logprobs=None,
                            **kwargs):
    """chat_format="chatml-function-calling": ChatML with the tools described in a system turn; the model's
    calls (tool_choice "auto", "required" or a named function) come back parsed as message.tool_calls. Other
    keywords of create_chat_completion (seed, logit_bias, reasoning_format ...) pass through kwargs."""
    return _function_calling("chatml-function-calling", locals())


def functionary_v1_v2_chat_handler(llama, messages, functions=None, function_call=None, tools=None,
                                   tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                                   min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                                   stop=[], response_format=None, max_tokens=None,  # noqa: B006
                                   presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                                   repeat_penalty: float = 1.1, tfs_z: float = 1.0, mirostat_mode: int = 0,
                                   mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model=None,
                                   logits_processor=None, grammar=None, **kwargs):
    """chat_format="functionary-v1" / "functionary-v2": the GGUF's own (functionary) template, read by
    llama.cpp's chat layer; UnsupportedFeatureError when it finds no tool calls in it."""
    return _function_calling("functionary-v2", locals())


def _function_calling(chat_format: str, arguments: dict[str, Any]):
    options = dict(arguments)
    kwargs = options.pop("kwargs")
    options.setdefault("logprobs", None)
    options.setdefault("top_logprobs", None)
    for name in ("seed", "logit_bias"):
        options[name] = kwargs.pop(name, None)
    return _chat.create(chat_format=chat_format, **options, **kwargs)


class Jinja2ChatFormatter:
    """Render messages with a Hugging Face style Jinja chat template (sandboxed, trim_blocks and lstrip_blocks,
    `raise_exception`, `strftime_now`, a `tojson` filter keeping non-ASCII text), under the limits of
    llmplace/jinja_limits.py (time, output size, ranges, repetition, format widths, call depth): a template past
    one raises TemplateError instead of hanging or exhausting the process."""

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                 stop_token_ids: list[int] | None = None) -> None:
        import jinja2
        import jinja2.ext

        self.template, self.eos_token, self.bos_token = template, eos_token, bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        if isinstance(template, str) and len(template) > jinja_limits.MAX_TEMPLATE_CHARS:
            raise TemplateError(f"the chat template is {len(template)} characters long (the limit is "
                                f"{jinja_limits.MAX_TEMPLATE_CHARS}); a chat template should only format the messages")
        # The template is a program from a model file or a hub config: llama-cpp-python's plain sandbox stops
        # escapes, not exhaustion, so it renders under llmplace's limits, as llmplace's own chat templates do.
        environment = jinja_limits.environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                               extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = jinja_limits.limited_filter(
            "tojson", lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False:
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
        try:
            self._template = environment.from_string(template)
        except jinja2.TemplateSyntaxError:
            raise  # what llama-cpp-python's formatter raises for invalid Jinja
        except (RecursionError, MemoryError, SyntaxError) as exc:  # too deep for Jinja's parser, Python's compiler
            raise TemplateError(f"the chat template could not be compiled ({type(exc).__name__}: {str(exc)[:200]}); "
                                "a chat template should only format the messages") from None

    def __call__(self, *, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                 **kwargs: Any) -> ChatFormatterResponse:
        def raise_exception(message: str):
            raise ValueError(message)

        prompt = _render_limited(
            self._template, messages=messages, eos_token=self.eos_token, bos_token=self.bos_token,
            raise_exception=raise_exception, add_generation_prompt=self.add_generation_prompt, functions=functions,
            function_call=function_call, tools=tools, tool_choice=tool_choice,
            strftime_now=lambda f: datetime.now().strftime(f), **kwargs)
        stopping_criteria = None
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            # llama-cpp-python's criterion: the last token evaluated is one of the stop token ids.
            stopping_criteria = [lambda tokens, logits: len(tokens) > 0 and int(tokens[-1]) in ids]
            from .llama import StoppingCriteriaList

            stopping_criteria = StoppingCriteriaList(stopping_criteria)
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token], stopping_criteria=stopping_criteria,
                                     added_special=True)

    def to_chat_handler(self) -> LlamaChatCompletionHandler:
        return chat_formatter_to_chat_completion_handler(self)


def _render_limited(template, **variables: Any) -> str:
    """Render under jinja_limits: a template past a limit (or exhausting the interpreter some other way) raises
    TemplateError. Its ordinary failures (raise_exception's ValueError, an undefined name, a TypeError) pass
    through unchanged, as llama-cpp-python's formatter raises them."""
    try:
        return jinja_limits.render(template, **variables)
    except jinja_limits.LimitExceeded as exc:
        raise TemplateError(f"the chat template exceeded its limits: {exc}; a chat template should only format "
                            "the messages") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise TemplateError(f"the chat template exhausted the interpreter ({type(exc).__name__}: {str(exc)[:200]}); "
                            "a chat template should only format the messages") from None


# The multimodal chat handlers (images through a projector, llmplace.images): defined in _images.py, named here as
# upstream's module names them.
from ._images import Gemma4ChatHandler, Llava15ChatHandler, MTMDChatHandler  # noqa: E402, F401
