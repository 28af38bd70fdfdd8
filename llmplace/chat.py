"""Chat: a multi-turn conversation with a model, its chat template, and one KV cache kept across turns.

    with llmplace.Chat("model.gguf", system_prompt="Answer in one sentence.") as chat:
        print(chat.submit("What is the capital of France?", temperature=0).text)
        for piece in chat.stream("And of Italy?"):
            print(piece, end="", flush=True)

Every turn renders the whole conversation with the template (chat_template.py) and hands the tokens to
`stream_generate` with the Chat's one `Context`: the tokens the cache already holds (the conversation so
far, up to where the re-rendered text first differs from what was generated, usually the end-of-turn
marker the template appends) are not recomputed, so a turn evaluates only its new message.

Policies (chosen here, tested in tests/test_chat.py):
- Context full: by default a turn whose rendered conversation does not fit raises `ContextOverflowError`
  before anything is computed, and the conversation is unchanged. With `truncate=True` the oldest
  user/assistant exchanges are dropped (the system prompt is always kept) until the conversation plus room
  for the reply (max_tokens, at most half the context) fits; `Reply.dropped` counts the messages dropped. A
  reply that reaches the end of the context ends with finish_reason "length".
- Interruption: `abort()` (from any thread), breaking out of `stream()`, or Ctrl-C (KeyboardInterrupt, which
  is re-raised) end the reply early. The user's message and the partial reply (the text produced so far,
  possibly empty) are kept in the history, with finish_reason "abort", as a chat UI keeps a stopped answer;
  the KV cache is left consistent, so the next turn works and reuses it. An error during generation (not an
  interruption) leaves the history as it was before the turn.
- Tools and reasoning: with `tools=` (OpenAI's function tools) a turn is rendered, constrained and read back by
  llama.cpp's chat layer (chat_tools.py, the drop-in's path): the template describes the tools, a lazy grammar
  starts at the family's tool-call trigger ("auto"; "required" or a named function force a call), and the reply
  is parsed into `Reply.tool_calls`, `Reply.reasoning_content` and its content. The assistant message kept in the
  history holds them as the template expects them (OpenAI's shape), so `add_tool_result(call_id, result)`
  then `submit()` continue the conversation. Models that think get their thinking separated
  (reasoning_format="none" keeps it inline), and `reasoning_budget` / `enable_thinking=False` limit it where
  the template supports it. A template that cannot describe tools raises InvalidParameterError for tools.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping, Sequence

from .chat_template import ChatTemplate, format_chat, validate_messages
from .chat_tools import (
    REASONING_FORMATS,
    ChatTemplates,
    ParsedReply,
    RenderedChat,
    ReplyStream,
    ThinkingBudget,
    ToolCall,
    ToolCallGrammar,
    ToolCallParseError,
    check_tool_messages,
    check_tools,
    resolve_tool_choice,
)
from .context import Context
from .context_lock import GenerationHold
from .errors import (
    AbortedError,
    BusyError,
    ClosedError,
    ContextOverflowError,
    InvalidParameterError,
    LlmplaceError,
    NoProjectorError,
    TemplateError,
)
from .generation import GenerationStep, request, stream_generate
from .images import ImagePrompt, ImageSource, Projector, image_part, image_urls, load_image, with_markers
from .model import Model
from .planning import load
from .sampling import SamplingParams
from .token_loop import LogitsHooks

__all__ = ["Chat", "Reply", "format_chat"]

_SAMPLING_NAMES = frozenset(f.name for f in fields(SamplingParams))
# What a turn takes for tools and reasoning (checked by _check_tool_options), with the Chat's defaults.
_TOOL_DEFAULTS: dict[str, Any] = {"tools": None, "tool_choice": "auto", "parallel_tool_calls": False,
                                  "reasoning_format": "auto", "reasoning_budget": None, "enable_thinking": True}
# Keys a message may carry besides role and content: tool calls, their results, the reply's thinking.
_TOOL_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
_HISTORY_FORMAT = "llmplace.chat/1"


@dataclass(frozen=True)
class Reply:
    """One assistant reply and what it cost. `str(reply)` is its text.

    finish_reason: "stop" (end-of-turn token or a stop string), "length" (max_tokens or the context's end),
    "abort" (abort(), a break out of stream(), or Ctrl-C).
    prompt_tokens: tokens of the whole rendered conversation this turn; prompt_evaluated: how many of them were
    computed (the rest were already in the KV cache; 0 when the reply was stopped inside the prompt's decode).
    dropped: messages dropped by truncate=True this turn.
    speculative: the draft's counts (drafted, accepted, acceptance_rate) when the Chat speculates, else None.
    tool_calls: the calls the model made (turns with tools=), each a chat_tools.ToolCall (name, arguments as
    JSON text, id); finish_reason is then "tool_calls". reasoning_content: the thinking of a model that thinks,
    when it is kept apart from `text` (reasoning_format other than "none").
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    prompt_evaluated: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    elapsed: float
    dropped: int = 0
    speculative: object = None   # llmplace.speculative.SpeculativeStats
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning_content: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _Turn:
    """A prepared turn: the conversation it will leave behind and the tokens to generate from."""

    messages: list[dict[str, Any]]  # history to keep, including the new user message
    tokens: list[int] | ImagePrompt  # an ImagePrompt when the conversation holds images
    options: dict[str, Any]         # keywords for stream_generate
    dropped: int
    rendered: RenderedChat | None = None  # llama.cpp's chat layer rendered it (tools, or a model that thinks)
    hooks: LogitsHooks | None = None       # its tool-call grammar and thinking budget


def _speculation_keywords() -> frozenset[str]:
    """The speculative-decoding keywords stream_generate accepts in this build (none before it has them)."""
    return frozenset(inspect.signature(stream_generate).parameters) & {"draft", "depth", "lookup"}


class Chat:
    """A conversation with `model` (a Model, or the path of a GGUF file, then loaded and owned by the Chat).

    system_prompt: the first message, kept by reset() and by truncation. template: Jinja source or a
    name ('chatml', 'gemma', ...); default the model's own (chat_template.py). n_ctx, n_threads: of the
    Chat's Context (default min(4096, trained length)). max_tokens, stop and sampling keywords
    (temperature, top_k, top_p, min_p, seed, repeat_penalty, ...) are defaults for every turn; submit() and
    stream() take the same keywords for one turn. truncate: see the module docstring (default False: a full
    context raises ContextOverflowError).
    draft (a Model or a path), depth, lookup: speculative decoding, passed to stream_generate (which checks
    them); a draft given as a path is loaded once and owned by the Chat.
    projector: a multimodal projector (llmplace.images.Projector, or the path of an mmproj GGUF, then loaded and
    owned by the Chat): turns then take images (submit(text, images=[...])), kept in the history as image_url
    content parts.

    A Chat is used from one thread at a time: a turn (or reset, load_history ...) from another thread while a
    reply is being generated raises BusyError and leaves that reply alone. `abort()` may be called from any
    thread; so may `close()`, which waits for the token being computed (aborting a long prompt's decode) and
    makes the reply in flight raise ClosedError.
    """

    def __init__(self, model: Model | str | os.PathLike[str], system_prompt: str | None = None, *,
                 template: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
                 max_tokens: int = 512, stop: str | Sequence[str] = (), truncate: bool = False,
                 draft: Model | str | os.PathLike[str] | None = None, depth: int = 5, lookup: bool = False,
                 tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str | Mapping[str, Any] = "auto",
                 parallel_tool_calls: bool = False, reasoning_format: str = "auto",
                 reasoning_budget: int | None = None, enable_thinking: bool = True,
                 projector: Projector | str | os.PathLike[str] | None = None, **sampling: Any) -> None:
        self._owned: list[Model | Context | Projector] = []
        self.projector: Projector | None = None  # what close() frees: the context, and models loaded from paths
        self._context: Context | None = None
        self._layer: ChatTemplates | None = None  # llama.cpp's chat layer for the template, made at first need
        self._layer_caps: dict[str, bool] = {}
        try:
            model = self._load_or_check(model, "model")
            self.model = model
            self.template = ChatTemplate.resolve(model, template)
            # The GGUF's own template: the chat layer reads it (and a "tool_use" variant) from the model.
            self._own_template = template is None and model.chat_template is not None
            self._defaults = self._options({
                "max_tokens": max_tokens, "stop": stop, "tools": tools, "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls, "reasoning_format": reasoning_format,
                "reasoning_budget": reasoning_budget, "enable_thinking": enable_thinking, **sampling})
            if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
                raise InvalidParameterError(f"system_prompt must be non-empty text or None, not {system_prompt!r}")
            self.truncate = bool(truncate)
            self._context = Context(model, n_ctx=n_ctx, n_threads=n_threads)
            self._owned.insert(0, self._context)
            if isinstance(projector, Projector):
                if projector.model is not model:
                    raise InvalidParameterError("the projector was loaded for another model than the Chat's")
                self.projector = projector
            elif projector is not None:
                self.projector = Projector(model, projector, n_threads=n_threads)
                self._owned.insert(0, self.projector)
            self._speculation = self._speculation_options(draft, depth, lookup, n_threads)
        except BaseException:
            self.close()
            raise
        self._messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
        self._abort_requested = threading.Event()
        self._active = False
        self.last: Reply | None = None

    # ---- set-up helpers ----
    def _options(self, options: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Merge per-turn keywords over `base` and check them now, so a bad value raises at the call."""
        unknown = set(options) - _SAMPLING_NAMES - {"max_tokens", "stop"} - set(_TOOL_DEFAULTS)
        if unknown:
            raise InvalidParameterError(f"unknown option(s) {', '.join(sorted(unknown))}; a turn takes max_tokens, "
                                        f"stop, {', '.join(_TOOL_DEFAULTS)} and the sampling options "
                                        f"{', '.join(sorted(_SAMPLING_NAMES))}")
        merged = {**_TOOL_DEFAULTS, **(base or {}), **options}
        self._check_tool_options(merged)
        max_tokens = merged.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidParameterError(f"max_tokens must be an int >= 1, not {max_tokens!r}")
        stop = merged.get("stop", ())
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise InvalidParameterError(f"stop must be a str or a list of str, not {stop!r}")
        merged["stop"] = list(stop)
        self._check_sampling(merged, speculating=bool(getattr(self, "_speculation", None)))
        return merged

    @staticmethod
    def _check_tool_options(options: dict[str, Any]) -> None:
        """tools, tool_choice, reasoning_format, reasoning_budget, enable_thinking, parallel_tool_calls: checked
        (and tools copied into a list) as the drop-in checks them."""
        options["tools"] = check_tools(options["tools"]) or None
        resolve_tool_choice(options["tools"], options["tool_choice"])  # a bad choice raises here
        if options["reasoning_format"] not in REASONING_FORMATS:
            raise InvalidParameterError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, not "
                                        f"{options['reasoning_format']!r}")
        budget = options["reasoning_budget"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise InvalidParameterError(f"reasoning_budget must be a number of tokens >= 0, or None for no limit, "
                                        f"not {budget!r}")
        for name in ("enable_thinking", "parallel_tool_calls"):
            if not isinstance(options[name], bool):
                raise InvalidParameterError(f"{name} must be True or False, not {options[name]!r}")

    @staticmethod
    def _check_sampling(options: Mapping[str, Any], speculating: bool) -> None:
        params = SamplingParams(**{k: v for k, v in options.items() if k in _SAMPLING_NAMES})  # validates
        if speculating:
            from . import speculative

            speculative.check_params(params)

    def _load_or_check(self, value: object, what: str) -> Model:
        """`value` (the `what` argument) as a Model: loaded when a path, and then owned by the Chat."""
        if isinstance(value, (str, os.PathLike)):
            model = load(value)
            self._owned.append(model)
            return model
        if not isinstance(value, Model):
            raise InvalidParameterError(f"{what} must be a Model or the path of a .gguf file, not "
                                        f"{type(value).__name__}")
        return value

    def _speculation_options(self, draft: Model | str | os.PathLike[str] | None, depth: int, lookup: bool,
                             n_threads: int | None) -> dict[str, Any]:
        """stream_generate's speculative keywords, checked now (an incompatible draft, a bad depth or sampling
        options speculation refuses raise here rather than at the first turn)."""
        if draft is None and not lookup:
            return {}
        supported = _speculation_keywords()
        wanted = {"draft"} if draft is not None else set()
        if lookup:
            wanted.add("lookup")
        if not wanted <= supported:
            raise InvalidParameterError("this build of llmplace has no speculative decoding in stream_generate "
                                        "yet; create the Chat without draft= and lookup=")
        if draft is not None and lookup:
            raise InvalidParameterError("pass either draft= (a draft model) or lookup=True (prompt lookup), not both")
        from . import speculative

        speculative.check_depth(depth)
        self._check_sampling(self._defaults, speculating=True)
        options: dict[str, Any] = {}
        if draft is not None:
            draft = self._load_or_check(draft, "draft")
            speculative.check_compatible(self.model, draft)
            # The draft's own context, sized like the target's and kept for the Chat's life, so that its
            # cache too is reused from turn to turn (stream_generate takes a draft Context for this).
            draft_context = Context(draft, n_ctx=self._check_usable().n_ctx, n_threads=n_threads)
            self._owned.insert(1, draft_context)
            options["draft"] = draft_context
        if lookup:
            options["lookup"] = lookup
        if "depth" in supported:
            options["depth"] = depth
        return options

    # ---- lifetime ----
    def close(self) -> None:
        """Free the Chat's context (and models it loaded from paths). Safe to call twice."""
        for obj in getattr(self, "_owned", ()):
            obj.close()
        self._owned = []

    @property
    def closed(self) -> bool:
        return self._context is None or self._context.closed

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self) -> Context:
        context = self._context
        if context is None or context.closed:  # self.closed
            raise ClosedError("this Chat is closed (or its Model was closed); create a new Chat")
        claim = context._claim
        if claim.holder is not None:  # a turn holds the Chat's context, from stream() to the end of its reply
            if claim.holder_thread != threading.get_ident():
                raise BusyError("this Chat is generating a reply in another thread: a Chat serves one thread at "
                                "a time; wait for the reply to end, or give each thread its own Chat")
            raise InvalidParameterError("a reply is still streaming from this Chat; finish iterating it (or close "
                                        "the generator) before the next turn")
        return context

    # ---- history ----
    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as [{"role": ..., "content": ...}, ...] (a copy), system prompt first if any.
        Turns with tools add OpenAI's keys: an assistant message's "tool_calls" (and "reasoning_content"), a
        tool result's "tool_call_id" and "name"."""
        return [json.loads(json.dumps(m)) for m in self._messages]

    @property
    def system_prompt(self) -> str | None:
        return self._messages[0]["content"] if self._messages and self._messages[0]["role"] == "system" else None

    def load_history(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Replace the conversation (system prompt included) with `messages`, checked first. The KV cache
        keeps whatever prefix the new conversation shares with the old. Messages may hold tool calls and
        results in OpenAI's shape (see `history`)."""
        self._check_usable()
        checked = _checked_messages(messages)
        if any(m["role"] == "system" for m in checked[1:]):
            raise InvalidParameterError("a system message may only come first in the history")
        # the template accepts it (raises otherwise)
        if _has_tool_turns(checked):
            self._render(checked, self._defaults, add_generation_prompt=False)
        else:
            self.template.render(checked, add_generation_prompt=False)
        self._messages = checked

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """Answer one of the calls of the last reply with its tool's result (a str, JSON text for structured
        results): it goes into the history as a "tool" message; `submit()` (no text) then lets the model read
        it. Raises InvalidParameterError for an id no call of the last reply has, or one already answered."""
        self._check_usable()
        if not isinstance(content, str):
            raise InvalidParameterError(f"a tool result must be a str (JSON text for structured results), not "
                                        f"{type(content).__name__}")
        calls: dict[str, str] = {}
        answered: set[str] = set()
        for message in reversed(self._messages):
            if message["role"] == "tool":
                answered.add(message.get("tool_call_id", ""))
                continue
            if message["role"] == "assistant":
                calls = {c["id"]: c["function"]["name"] for c in message.get("tool_calls") or ()}
            break
        if tool_call_id not in calls:
            known = ", ".join(map(repr, calls)) or "none: the last reply called no tool"
            raise InvalidParameterError(f"no tool call {tool_call_id!r} to answer; the last reply's calls: {known}")
        if tool_call_id in answered:
            raise InvalidParameterError(f"tool call {tool_call_id!r} is already answered")
        self._messages.append({"role": "tool", "tool_call_id": tool_call_id, "name": calls[tool_call_id],
                               "content": content})

    @classmethod
    def from_history(cls, model: Model | str | os.PathLike[str], messages: Sequence[Mapping[str, Any]],
                     **kwargs: Any) -> Chat:
        """A Chat continuing `messages` (a system message first, if any, becomes the system prompt)."""
        chat = cls(model, **kwargs)
        try:
            chat.load_history(messages)
        except BaseException:
            chat.close()
            raise
        return chat

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON ({"format": ..., "messages": [...]}); `load` reads it back."""
        data = {"format": _HISTORY_FORMAT, "messages": self.history}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the history with one written by `save` (or a plain JSON list of messages)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidParameterError(f"could not read a chat history from {path}: {exc}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        if messages is None:
            raise InvalidParameterError(f"{path} holds no 'messages' list; write it with Chat.save")
        self.load_history(messages)

    def reset(self) -> None:
        """Forget the conversation but the system prompt. The cache keeps the system prompt's tokens only, so
        n_cached and stats() describe the new conversation."""
        context = self._check_usable()
        self._messages = self._messages[:1] if self.system_prompt is not None else []
        self.last = None
        try:
            kept = self.template.tokens(self.model, self.template.render(self._messages, add_generation_prompt=False))
        except LlmplaceError:  # a template that cannot render a system prompt alone: start from nothing
            kept = []
        if kept:
            context.reuse_prefix(kept, keep_last=0)
        else:
            context.clear()

    # ---- state ----
    @property
    def n_ctx(self) -> int:
        return self._check_usable().n_ctx

    @property
    def n_cached(self) -> int:
        """Tokens held in the KV cache now."""
        context = self._context
        return 0 if context is None or context.closed else len(context.tokens)

    @property
    def last_prompt_evaluated(self) -> int:
        """Prompt tokens the last turn computed (0 before the first turn)."""
        return self.last.prompt_evaluated if self.last else 0

    def stats(self) -> dict[str, Any]:
        """The last reply's figures and the context's fill, for display."""
        context = self._context
        out = {"messages": len(self._messages), "cached_tokens": self.n_cached,
               "n_ctx": 0 if context is None or context.closed else context.n_ctx}
        if self.last is not None:
            out.update({f.name: getattr(self.last, f.name) for f in fields(Reply) if f.name != "text"})
        return out

    # ---- turns ----
    @property
    def streaming(self) -> bool:
        """True while a reply is being generated (between the first step of stream() and its end)."""
        return self._active

    def abort(self) -> None:
        """Stop the reply being generated (thread-safe; a no-op when none is): a llama_decode in progress
        (a long prompt) stops at its next graph node, otherwise generation stops after the current token.
        The partial reply is kept (see the module docstring)."""
        self._abort_requested.set()
        if self._active:
            for context in self._contexts():
                context.abort()

    def _contexts(self) -> list[Context]:
        """The Chat's open contexts: the model's and, when speculating with a draft model, the draft's."""
        contexts = [self._context, getattr(self, "_speculation", {}).get("draft")]
        return [c for c in contexts if isinstance(c, Context) and not c.closed]

    def submit(self, text: str | None = None, *, images: Sequence[ImageSource] = (), **options: Any) -> Reply:
        """Send a user message and return the whole reply. Keywords (max_tokens, stop, temperature, tools,
        tool_choice, reasoning_format ...) override the Chat's defaults for this turn. No text: reply to the
        tool results just added (add_tool_result). images: pictures the message shows (bytes, paths, data: URLs:
        llmplace.images.load_image), before its text; the Chat needs a projector."""
        steps = self.stream_deltas(text, images=images, **options)
        for _ in steps:
            pass
        assert self.last is not None  # the turn's end wrote it
        return self.last

    def stream(self, text: str | None = None, *, images: Sequence[ImageSource] = (), **options: Any
               ) -> Iterator[str]:
        """Send a user message; yield the reply's text as it is generated (pieces, never empty). The Reply
        with its figures is `chat.last` once the iteration ends. Arguments are checked at the call, and the
        Chat is taken for this turn at the call: another turn (any thread) raises BusyError until it ends.
        The text is the reply's content: kept-apart thinking and tool calls are in `chat.last` (or use
        stream_deltas)."""
        turn = self._prepare(text, options, images)
        return _contents(self._run(turn, GenerationHold(self._context)))

    def stream_deltas(self, text: str | None = None, *, images: Sequence[ImageSource] = (), **options: Any
                      ) -> Iterator[dict[str, Any]]:
        """As stream(), yielding OpenAI-style chat deltas: {"content": ...}, {"reasoning_content": ...} and
        {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]} (a call's arguments come
        in pieces after its first delta, as OpenAI streams them)."""
        turn = self._prepare(text, options, images)
        return self._run(turn, GenerationHold(self._context))

    def _render(self, messages: list[dict[str, Any]], options: Mapping[str, Any], *,
                add_generation_prompt: bool = True) -> tuple[list[int] | ImagePrompt, RenderedChat | None]:
        """The prompt tokens for `messages`, and llama.cpp's chat layer's rendering when the turn is its own
        (tools, tool turns in the history, or a model that thinks; otherwise the Chat's template renders).
        A conversation with images gives an ImagePrompt: rendered with the projector's marker where each image
        is, then tokenized by the projector."""
        urls = image_urls(messages)
        if urls:
            projector = self.projector
            if projector is None:
                raise NoProjectorError(f"the conversation has {len(urls)} image(s) but the Chat has no projector: "
                                       "create it with projector='mmproj.gguf' (or a llmplace.images.Projector)")
            plain = with_markers(messages, projector.marker)
            tokens, rendered = self._render(plain, options, add_generation_prompt=add_generation_prompt)
            text = rendered.prompt if rendered is not None else self.template.render(
                plain, add_generation_prompt=add_generation_prompt)
            wrote_bos = bool(self.template.bos_token) and text.startswith(self.template.bos_token)
            return projector.tokenize(text, [load_image(url) for url in urls], add_special=not wrote_bos), rendered
        layer = self._chat_layer(options, messages)
        if layer is None:
            return self.template.tokens(self.model, self.template.render(
                messages, add_generation_prompt=add_generation_prompt)), None
        tools = options["tools"]
        if tools and options["tool_choice"] != "none" and not self._layer_caps.get("supports_tool_calls"):
            raise InvalidParameterError(
                f"the chat template of {self.model.path.name} cannot describe tools to the model (llama.cpp's chat "
                "layer finds no tool calls in it); pass template= a template that does (Qwen 2.5/3, Hermes, "
                "Llama 3.x, Mistral ...), or tool_choice='none'")
        rendered = layer.render(messages, tools=tools, tool_choice=options["tool_choice"],
                                parallel_tool_calls=options["parallel_tool_calls"],
                                reasoning_format=options["reasoning_format"],
                                enable_thinking=options["enable_thinking"],
                                add_generation_prompt=add_generation_prompt)
        return self.template.tokens(self.model, rendered.prompt), rendered

    def _chat_layer(self, options: Mapping[str, Any], messages: list[dict[str, Any]]) -> ChatTemplates | None:
        """llama.cpp's chat layer for the Chat's template when this turn needs it, else None."""
        needed = (bool(options["tools"]) or _has_tool_turns(messages) or options["reasoning_budget"] is not None
                  or not options["enable_thinking"])
        if not needed and options["reasoning_format"] == "none":
            return None
        if self._layer is None:
            try:
                self._layer = self._make_layer()
            except (TemplateError, InvalidParameterError):
                if needed:
                    raise
                self._layer_caps = {"supports_thinking": False}  # a plain template: rendered as before
                return None
        if not needed and not self._layer_caps.get("supports_thinking"):
            return None  # nothing to separate: the Chat's own rendering (unchanged for models that do not think)
        return self._layer

    def _make_layer(self) -> ChatTemplates:
        template = self.template
        if self._own_template:
            layer = ChatTemplates(self.model)
        elif template.source is not None:
            layer = ChatTemplates(template=template.source, bos_token=template.bos_token,
                                  eos_token=template.eos_token)
        else:
            raise InvalidParameterError(f"the template {template.name!r} is rendered by llama.cpp's built-in "
                                        "engine, which cannot describe tools or thinking; pass its Jinja source")
        probe = layer.render([{"role": "user", "content": "Hi"}], reasoning_format="auto")
        self._layer_caps = {**probe.caps, "supports_thinking": probe.supports_thinking}
        return layer

    def _prepare(self, text: str | None, options: Mapping[str, Any], images: Sequence[ImageSource] = ()) -> _Turn:
        context = self._check_usable()
        if text is None:
            if not self._messages or self._messages[-1]["role"] != "tool":
                raise InvalidParameterError("no message: the message must be a str (the user's text); a turn "
                                            "without one replies to tool results added with add_tool_result")
        elif not isinstance(text, str):
            raise InvalidParameterError(f"the message must be a str, not {type(text).__name__}")
        elif not text.strip():
            raise InvalidParameterError("the message is empty; type some text")
        options = self._options(options, self._defaults)
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise InvalidParameterError("images must be a list of images (bytes, paths, data: URLs)")
        content: str | list[dict[str, Any]] | None = text
        if images:
            if text is None:
                raise InvalidParameterError("images go with a user message: pass its text too")
            if self.projector is None:
                raise NoProjectorError("this Chat has no projector to see images: create it with "
                                       "projector='mmproj.gguf' (or a llmplace.images.Projector)")
            # kept in the history as OpenAI content parts, the images first (as llama-mtmd-cli puts them)
            content = [*(image_part(image) for image in images), {"type": "text", "text": text}]
        messages = self._messages + ([{"role": "user", "content": content}] if content is not None else [])
        tokens, rendered = self._render(messages, options)
        n_ctx, dropped = context.n_ctx, 0
        if self.truncate:
            room = min(options["max_tokens"], n_ctx // 2)
            first = 1 if self.system_prompt is not None else 0
            while len(tokens) + room > n_ctx and len(messages) - first > 1:
                # Drop the oldest exchange: up to and including the next user message after the first one,
                # so the conversation still starts with a user turn (templates such as Gemma's insist).
                cut = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"),
                           len(messages) - 1)
                dropped += cut - first
                messages = messages[:first] + messages[cut:]
                tokens, rendered = self._render(messages, options)
        if len(tokens) >= n_ctx:
            how = ("shorten the system prompt or this message" if self.truncate else
                   "call reset(), or create the Chat with truncate=True to drop the oldest turns")
            raise ContextOverflowError(
                f"the conversation with this message is {len(tokens)} tokens but the context holds {n_ctx} (and the "
                f"reply needs room too): {how}, or use a larger n_ctx (this model was trained on "
                f"{self.model.n_ctx_train})")
        hooks = None
        if rendered is not None:
            # Built now, so that a schema the grammar builder refuses raises at the call.
            grammar = ToolCallGrammar(self.model, rendered) if rendered.grammar else None
            budget = options["reasoning_budget"]
            thinking = (ThinkingBudget(self.model, rendered, budget)
                        if budget is not None and rendered.supports_thinking else None)
            if grammar is not None or thinking is not None:
                hooks = LogitsHooks(thinking, grammar)
            options = {**options, "stop": [*options["stop"], *(s for s in rendered.additional_stops
                                                                if s not in options["stop"])]}
        generation = {k: v for k, v in options.items() if k not in _TOOL_DEFAULTS}
        return _Turn(messages, tokens, generation, dropped, rendered, hooks)

    def _run(self, turn: _Turn, hold: GenerationHold) -> Generator[dict[str, Any], None, None]:
        """The turn's reply as chat deltas, generated under `hold` (the Chat's context), released once the
        history and the cache are put in order: no other turn can start in between."""
        context = self._context
        assert context is not None  # stream checked it (_prepare)
        self._active = True
        self._abort_requested.clear()
        start = time.perf_counter()
        pieces: list[str] = []
        last = None
        finish = "abort"           # unless generation runs to its own end
        keep = True                # record the turn in the history (False after an error)
        consistent = True          # the cache and context.tokens are known to agree
        steps: Generator[GenerationStep, None, None] | None = None
        # Turns of llama.cpp's chat layer: the text so far re-read as content, thinking and tool calls.
        reader = ReplyStream(turn.rendered.reply_parser()) if turn.rendered is not None else None
        parsed: ParsedReply | None = None
        try:
            # a grammar draws token by token: no speculation for this turn
            speculation = self._speculation if turn.hooks is None else {}
            steps = request(self.model, turn.tokens, context=context, add_special=False, hold=hold,
                            hooks=turn.hooks, **turn.options, **speculation).steps()
            for step in steps:
                last = step
                if step.text:
                    pieces.append(step.text)
                    if reader is None:
                        yield {"content": step.text}
                    else:
                        yield from reader.feed(step.text)
                if step.finish_reason is not None:
                    finish = step.finish_reason
                    break
                if self._abort_requested.is_set():
                    break
            if reader is not None:
                # A reply cut short (max_tokens, abort()) is read as partial; a whole one the parser cannot read
                # raises ToolCallParseError (the history is then left as it was).
                parsed, deltas = reader.finish(partial=finish != "stop")
                yield from deltas
        except AbortedError:
            pass                   # abort() arrived during a llama_decode: the cache is consistent
        except GeneratorExit:
            raise                  # the caller stopped iterating: a partial reply, recorded below
        except KeyboardInterrupt:
            consistent = False     # may have landed between a decode and its bookkeeping
            raise
        except BaseException:
            consistent, keep = False, False
            raise
        finally:
            try:
                self._end_turn(context, steps, consistent)
                if keep:
                    reply_text = "".join(pieces)
                    if reader is not None and parsed is None:  # interrupted: what was written, read leniently
                        parsed = _read_partial(reader, reply_text)
                    if parsed is not None and finish != "stop":
                        parsed = _whole_calls(parsed)
                    message: dict[str, Any] = {"role": "assistant", "content": reply_text}
                    if parsed is not None:
                        message["content"] = parsed.content
                        if parsed.reasoning_content:
                            message["reasoning_content"] = parsed.reasoning_content
                        if parsed.tool_calls:
                            message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
                            finish = "tool_calls" if finish == "stop" else finish
                    self._messages = turn.messages + [message]
                    now = time.perf_counter()
                    self.last = Reply(
                        text=message["content"], finish_reason=finish, prompt_tokens=len(turn.tokens),
                        prompt_evaluated=(last.prompt_tokens - last.prompt_cached) if last else 0,
                        generated_tokens=last.generated_tokens if last else 0,
                        prompt_tps=last.prompt_tps if last else 0.0,
                        generation_tps=last.generation_tps if last else 0.0,
                        elapsed=now - start, dropped=turn.dropped, speculative=getattr(last, "speculative", None),
                        tool_calls=parsed.tool_calls if parsed is not None else (),
                        reasoning_content=parsed.reasoning_content if parsed is not None else "")
            finally:
                hold.release()  # only now may another turn start: the history and the cache are in order
                if reader is not None:
                    reader.close()

    def _end_turn(self, context: Context, steps: Generator[GenerationStep, None, None] | None,
                  consistent: bool) -> None:
        """Stop the generation and leave the cache consistent (the history is recorded by the caller)."""
        if steps is not None:
            steps.close()
        self._active = False
        self._abort_requested.clear()
        # An abort() that came after the last decode would otherwise stop the next one early (decode
        # clears the flag, decode_one does not).
        for each in self._contexts():
            each._abort_flag[0] = 0
        if not consistent and not context.closed:
            # Drop the last cached token, which also removes any KV cell that llama.cpp filled but
            # context.tokens does not list; the next turn recomputes it.
            try:
                if len(context.tokens) > 1:
                    context.truncate(len(context.tokens) - 1)
                else:
                    context.clear()
            except ClosedError:
                pass  # closed from another thread meanwhile: no cache left to put in order

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._messages)} messages, {self.n_cached} cached tokens"
        return f"<llmplace.Chat {self.model.path.name}: {state}>"


def _contents(deltas: Generator[dict[str, Any], None, None]) -> Generator[str, None, None]:
    """The content pieces of a turn's deltas (what stream() yields); closing this closes the turn."""
    try:
        for delta in deltas:
            content = delta.get("content")
            if content:
                yield content
    finally:
        deltas.close()


def _read_partial(reader: ReplyStream, text: str) -> ParsedReply:
    """An interrupted reply read as partial output; text the parser cannot read stays content."""
    try:
        return reader.finish(partial=True)[0]
    except (ToolCallParseError, InvalidParameterError):
        return ParsedReply(text)


def _whole_calls(parsed: ParsedReply) -> ParsedReply:
    """A reply cut short (abort, max_tokens) without the call it was writing: arguments that are not whole JSON
    yet could neither be answered nor rendered again in the next turn."""
    calls = []
    for call in parsed.tool_calls:
        try:
            json.loads(call.arguments)
        except ValueError:
            continue
        if call.name:
            calls.append(call)
    return ParsedReply(parsed.content, parsed.reasoning_content, tuple(calls))


def _has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a conversation holds tool calls, tool results or kept-apart thinking (then llama.cpp's chat layer
    renders it: the Chat's own templates render role and content only)."""
    return any(m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning_content") for m in messages)


def _checked_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """validate_messages' check (roles, str contents), keeping the tool keys (_TOOL_KEYS) in OpenAI's shape: an
    assistant message with tool_calls may have content None (kept as ""), and the calls and results are checked
    by the chat layer's rules (chat_tools.check_tool_messages)."""
    if isinstance(messages, Sequence) and all(isinstance(m, Mapping) for m in messages):
        plain = [{**m, "content": "" if m.get("content") is None and m.get("tool_calls") else m.get("content")}
                 if "content" in m or m.get("tool_calls") else m for m in messages]
    else:
        plain = messages  # type: ignore[assignment]  # validate_messages says what is wrong
    checked: list[dict[str, Any]] = list(validate_messages(plain))
    for out, message in zip(checked, plain):
        for key in _TOOL_KEYS:
            if message.get(key) is not None:
                out[key] = json.loads(json.dumps(message[key]))
    if _has_tool_turns(checked):
        check_tool_messages(checked)
    return checked
