"""Completions and chat completions decoded together on the batching engine (`llmplace serve --slots N`, N >= 2).

The drop-in Llama answers a request on its one context, one request at a time. Here a request's prompt is
built exactly as the Llama builds it (compat/_completion.build_prompt; the chat template through
compat/_chat.render), its sampler chain is the Llama's (compat/_completion.sampling_params, with the Llama's
defaults read from its method signatures), and it is submitted to one llmplace.Engine on the Llama's model;
its steps are shaped into the same `text_completion` / `chat.completion` dicts and stream chunks by the same
functions the Llama uses. On the CPU a greedy request's reply is token for token the serial one (the engine's
guarantee, see llmplace/engine.py; the Engine is made with the Llama's thread count and flash attention setting).

What the engine does not do keeps the serial path (`serial_reason` says which): logprobs, echo, suffix
(fill-in-the-middle), grammar-constrained replies (response_format, forced tools / functions), a chat
handler or a chat_format that is a program (function calling), and repetition penalties (llama-cpp-python
penalizes the generated tokens only, the engine the prompt's as well, so the replies would differ).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import uuid
from typing import Iterator

from ..compat import _chat, _completion
from ..compat.llama import Llama
from ..compat.llama_chat_format import MTMDChatHandler, registered_handler
from ..engine import Engine, EngineRequest
from ..errors import BusyError, ContextOverflowError
from .metrics import Metrics

_SAMPLING_ARGUMENTS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                       "frequency_penalty", "presence_penalty", "seed", "logit_bias")
# The request options the engine path serves; a request with any other (logprobs, echo, suffix, grammar,
# tools, reasoning ...) set goes to the Llama. A list of what the engine does, not of what it does not: a
# field added to the server later is served by the Llama until it is added here, never silently dropped.
ENGINE_OPTIONS = frozenset(("max_tokens", "stop") + _SAMPLING_ARGUMENTS)


def _defaults(method) -> dict:
    """The Llama method's keyword defaults (temperature 0.8 for completions, 0.2 for chat ...): read, not copied."""
    return {name: p.default for name, p in inspect.signature(method).parameters.items()
            if p.default is not inspect.Parameter.empty}


COMPLETION_DEFAULTS = _defaults(Llama.create_completion)
CHAT_DEFAULTS = _defaults(Llama.create_chat_completion)


def _thinks(llama: Llama) -> bool:
    """Does the model's own template think (<think>...</think> ...)? Then llama.cpp's chat layer answers."""
    from ..compat._chat_tools import template_traits

    if llama.chat_format not in (None, "chat_template.default"):
        return False
    traits = template_traits(llama)
    return traits is not None and traits.supports_thinking


class BatchedGeneration:
    """The engine path of one server: which requests it takes, and the request → EngineRequest → dict steps."""

    def __init__(self, llama: Llama, engine: Engine, metrics: Metrics, max_queue: int) -> None:
        self.llama, self.engine, self.metrics, self.max_queue = llama, engine, metrics, max_queue
        # sampling_params advances the Llama's seed sequence (llama._seed): one request at a time, as serially
        self._seed_lock = threading.Lock()
        # Requests submitted and not yet answered. The bound is on these, not on the engine's wait list: that
        # list also holds requests the scheduler admits at its next step, so a burst arriving at idle slots
        # would fill it (and be refused) although every one of them is about to run.
        self.in_flight = 0

    # ---- which path ----
    def serial_reason(self, route: str, options: dict) -> str | None:
        """Why this request must take the serial Llama path (None: the engine serves it)."""
        present = sorted(name for name, value in options.items()
                         if name not in ENGINE_OPTIONS and value is not None and value is not False)
        if present:
            return f"{', '.join(present)}: served by the Llama one request at a time"
        defaults = CHAT_DEFAULTS if route == "chat" else COMPLETION_DEFAULTS
        penalties = {name: options.get(name, defaults[name])
                     for name in ("repeat_penalty", "frequency_penalty", "presence_penalty")}
        if penalties["repeat_penalty"] != 1.0 or penalties["frequency_penalty"] or penalties["presence_penalty"]:
            return "repetition penalties: the Llama penalizes generated tokens only, the engine the prompt's too"
        handler = self.llama.chat_handler
        # the image handler (--mmproj) renders a chat without images as the Llama's own chat path does, so the
        # engine may serve those (the server sends chats with images to the Llama)
        if route == "chat" and ((handler is not None and not isinstance(handler, MTMDChatHandler))
                                or registered_handler(self.llama.chat_format) is not None):
            return "a chat handler renders this model's prompts: served by the Llama"
        if route == "chat" and self.llama.reasoning_format != "none" and _thinks(self.llama):
            return "the model thinks: its reasoning_content is split out by the Llama"
        return None

    # ---- submission ----
    @contextlib.contextmanager
    def submitted(self, route: str, payload, options: dict) -> Iterator[tuple[EngineRequest, list[int]]]:
        """submit(), counted in flight until the block ends (then the request is cancelled if still running).
        Raises BusyError when every slot is busy and max_queue requests wait."""
        with self._seed_lock:
            if self.in_flight >= self.engine.slots + self.max_queue:
                raise BusyError(f"all {self.engine.slots} slots are busy and {self.max_queue} requests wait for "
                                "one: retry later")
            self.in_flight += 1
        try:
            request, tokens = self.submit(route, payload, options)
            try:
                yield request, tokens
            finally:
                request.cancel()  # nothing once it has ended; a stream whose client left ends here
        finally:
            with self._seed_lock:
                self.in_flight -= 1

    def submit(self, route: str, payload, options: dict) -> tuple[EngineRequest, list[int]]:
        """Build the prompt tokens as the Llama does and submit them; (request, prompt tokens).
        Raises ContextOverflowError (as the Llama, with its message), BusyError (the engine's queue is full),
        ClosedError."""
        llama = self.llama
        defaults = CHAT_DEFAULTS if route == "chat" else COMPLETION_DEFAULTS
        if route == "chat":
            tokens = _chat.render(llama, payload)
        else:
            tokens, _ = _completion.build_prompt(llama, payload, None)
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise ContextOverflowError(f"Requested tokens ({len(tokens)}) exceed context window of {n_ctx}")
        max_tokens = options.get("max_tokens", defaults["max_tokens"])
        if max_tokens is None or max_tokens <= 0:  # unlimited: up to the end of the context (as the Llama)
            max_tokens = n_ctx - len(tokens)
        max_tokens = min(max_tokens, n_ctx - len(tokens))
        stop = options.get("stop", defaults["stop"])
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if route == "chat":
            eos = llama._model.vocab.eos
            if eos is not None:
                stops.append(llama._model.vocab.token_text(eos))  # as compat/_chat.create (llama-cpp-python)
        sampling = {name: options.get(name, defaults[name]) for name in _SAMPLING_ARGUMENTS}
        with self._seed_lock:
            params = _completion.sampling_params(llama, **sampling)
            request = self.engine.submit(tokens, max_tokens=max_tokens, stop=stops, sampling=params)
        self.metrics.count_prompt(len(tokens))
        return request, tokens

    # ---- replies ----
    def steps(self, request: EngineRequest, gone) -> Iterator[tuple[int, str, str | None]]:
        """The request's steps as the (token, text, finish_reason) tuples the Llama's shaping functions read.
        A step "cancelled" (the client left) raises gone()."""
        count = self.metrics.count_generated
        for step in request:
            if step.finish_reason == "cancelled":
                raise gone()
            if step.token >= 0:
                count()
            yield step.token, step.text, step.finish_reason

    def reply(self, route: str, request: EngineRequest, tokens: list[int], payload, model_name: str, stream: bool,
              gone):
        """The dict (or the chunk iterator) the Llama's create_completion / create_chat_completion returns."""
        llama = self.llama
        info = {"id": f"cmpl-{uuid.uuid4()}", "created": int(time.time()), "model": model_name}
        prompt = tokens if route == "chat" else payload  # what the Llama's shaping sees as the prompt
        steps = self.steps(request, gone)
        completion: dict | Iterator[dict]
        if stream:
            completion = _completion._chunk_steps(llama, steps, None, info, None, prompt, tokens)
        else:
            completion = _completion._whole(llama, steps, None, info, tokens, prompt, None, False, None)
        return _chat.reshape(completion, stream, None) if route == "chat" else completion
