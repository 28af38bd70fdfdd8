"""Text generation: `stream_generate` yields one frozen `GenerationStep` per token; `generate` collects them.

A call becomes a checked `GenerationRequest` (`request`): its sampler, drafter and context, and the hold on
the context. Its steps prefill the prompt (reusing the context's cached prefix) and run the one token loop
(`token_loop.run`) over a token source: drawn one at a time, or verified drafts when speculating. Text is
assembled there (`text_assembly`), once for every caller. `generate`, `Chat` and the llama-cpp-python layer
read plain (token, text, finish_reason) tuples; `stream_generate` adds a GenerationStep with the timings.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence, TypeVar

from . import speculative
from .context import Context
from .context_lock import GenerationHold
from .errors import ContextOverflowError, InvalidParameterError, unknown_keyword_error
from .images import ImagePrompt
from .model import Model
from .sampling import Sampler, SamplingParams
from .speculative import SpeculativeStats
from .text_assembly import TextAssembler, stop_strings
from .token_loop import DrawnTokens, LogitsHooks, SequenceState, run

if TYPE_CHECKING:
    import os

    import numpy as np

    # draft=: a draft Model, a GGUF path, a Context of the draft model, or "lookup"
    DraftArgument = Model | Context | str | os.PathLike[str] | None
    Drafter = speculative.ModelDrafter | speculative.LookupDrafter


@dataclass(frozen=True)
class GenerationStep:
    """One generated token and what it added to the text."""

    token: int
    text: str                    # new text; "" while a multi-byte character or a possible stop string is pending
    finish_reason: str | None    # None while generating; "stop" (end-of-generation token or stop string) or "length"
    prompt_tokens: int           # tokens in the prompt
    prompt_cached: int           # prompt tokens reused from the context's cache (not recomputed)
    generated_tokens: int        # tokens generated so far, this one included
    prompt_tps: float            # prompt tokens computed per second
    generation_tps: float        # generated tokens per second so far
    elapsed: float               # seconds since the call started
    speculative: SpeculativeStats | None = None  # drafted/accepted counts, on the last step of a speculative call


@dataclass(frozen=True)
class Generation:
    """The result of `generate`: the text and how it ended."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    speculative: SpeculativeStats | None = None  # set when a draft model or prompt lookup was used

    def __str__(self) -> str:
        return self.text


def _prompt_tokens(model: Model, prompt: str | bytes | Sequence[int] | ImagePrompt, add_special: bool) -> list[int]:
    if isinstance(prompt, ImagePrompt):
        # text tokens and image placeholders, tokenized (and checked) by its Projector
        if prompt.projector.model is not model:
            raise InvalidParameterError("the ImagePrompt was tokenized by a projector of another model")
        return list(prompt.tokens)
    if isinstance(prompt, (str, bytes)):
        tokens = model.tokenize(prompt, add_special=add_special, parse_special=True)
    else:
        tokens = list(prompt)
        n_vocab = model.n_vocab
        bad = next((t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"prompt token {bad!r} is not a token id of this model (0 .. {n_vocab - 1})")
    if not tokens:
        raise InvalidParameterError("the prompt is empty: give at least one token or character")
    return tokens


def stream_generate(model: Model, prompt: str | bytes | Sequence[int] | ImagePrompt, *, max_tokens: int = 256,
                    stop: str | Sequence[str] = (), sampling: SamplingParams | None = None,
                    context: Context | None = None, add_special: bool = True, draft: DraftArgument = None,
                    depth: int = 5, lookup: bool = False, adaptive_depth: bool = True, **sampling_kwargs: Any
                    ) -> Iterator[GenerationStep]:
    """Generate from `prompt` (text, token ids, or text with images: an llmplace.images.ImagePrompt), yielding one
    GenerationStep per token.

    Sampling options (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
    presence_penalty, penalty_last_n, seed, logit_bias) are keywords, or one `sampling=SamplingParams(...)`.
    context: reuse a Context (its cached prefix of the prompt is not recomputed); by default a temporary
    one sized for prompt + max_tokens is made. Special tokens in text prompts (e.g. '<|im_start|>') are parsed.

    Speculative decoding (see llmplace/speculative/): draft= a draft Model, a GGUF path, a Context of the
    draft model (its cache is reused across calls) or "lookup"; lookup=True drafts by prompt lookup instead.
    depth: the most tokens drafted per target decode; adaptive_depth=False always drafts `depth` (for
    measuring, and for seed-reproducible sampling: adaptive depth follows timings). Greedy output equals
    plain decoding's; sampled output has the same distribution. An
    incompatible draft raises IncompatibleDraftError; repetition penalties and typical_p are refused.
    The last step's `speculative` field holds the counts (drafted, accepted, acceptance_rate).

    Arguments are checked when this is called, not at the first step: a bad value raises here, and so does
    BusyError when `context` is in use (by another thread, or by another generation not yet finished).
    close() of the context (or its model) from another thread stops the generation: its next step raises
    ClosedError (a decode in flight is aborted first).
    """
    return request(model, prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, context=context,
                   add_special=add_special, draft=draft, depth=depth, lookup=lookup, adaptive_depth=adaptive_depth,
                   **sampling_kwargs).steps()


_Step = TypeVar("_Step")  # what a run yields: GenerationStep, or (token, text, finish_reason)
_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def request(model: Model, prompt: str | bytes | Sequence[int] | ImagePrompt, *, max_tokens: int = 256,
           stop: str | Sequence[str] = (), sampling: SamplingParams | None = None, context: Context | None = None,
           add_special: bool = True, draft: DraftArgument = None, depth: int = 5, lookup: bool = False,
           adaptive_depth: bool = True, hold: GenerationHold | None = None, hooks: LogitsHooks | None = None,
           **sampling_kwargs: Any) -> GenerationRequest:
    """stream_generate's checks and resources (sampler, drafter, a context when none is given, the hold on the
    context), as a GenerationRequest. hold: a GenerationHold the caller took on `context` (Chat, Llama: they hold the
    context across their own clean-up and release it themselves). hooks: what the call does to each token's
    logits around the draw (a tool-call grammar, a thinking budget: token_loop.LogitsHooks); the request owns
    them from here on (closed when its steps end, or now if it is refused). Hooks need each token drawn on its
    own, so they cannot be combined with speculative decoding."""
    try:
        return _request(model, prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, context=context,
                        add_special=add_special, draft=draft, depth=depth, lookup=lookup,
                        adaptive_depth=adaptive_depth, hold=hold, hooks=hooks, **sampling_kwargs)
    except BaseException:
        if hooks is not None:
            hooks.close()
        raise


def _request(model: Model, prompt: str | bytes | Sequence[int] | ImagePrompt, *, max_tokens: int,
             stop: str | Sequence[str], sampling: SamplingParams | None, context: Context | None, add_special: bool,
             draft: DraftArgument, depth: int, lookup: bool, adaptive_depth: bool, hold: GenerationHold | None,
             hooks: LogitsHooks | None, **sampling_kwargs: Any) -> GenerationRequest:
    unknown = set(sampling_kwargs) - _SAMPLING_NAMES
    if unknown:
        # otherwise SamplingParams(**...) raises a TypeError naming that internal class, not the typo's fix
        own = set(inspect.signature(request).parameters) - {"model", "prompt", "sampling_kwargs", "hold", "hooks"}
        raise unknown_keyword_error("generate/stream_generate", unknown, own | _SAMPLING_NAMES)
    if sampling is not None and sampling_kwargs:
        raise InvalidParameterError("pass sampling options either as sampling=SamplingParams(...) or as keywords, "
                                    "not both")
    params = sampling or SamplingParams(**sampling_kwargs)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise InvalidParameterError(f"max_tokens must be an int >= 0, not {max_tokens!r}")
    stops = stop_strings(stop)
    tokens = _prompt_tokens(model, prompt, add_special)
    speculate = draft is not None or bool(lookup)
    if speculate and hooks is not None:
        raise InvalidParameterError("a grammar or logits hooks need each token drawn on its own: generate without "
                                    "draft= / lookup= for this call")
    if speculate:
        if isinstance(prompt, ImagePrompt):
            raise InvalidParameterError("speculative decoding does not take a prompt with images (a draft model "
                                        "cannot see them): generate without draft= / lookup=")
        speculative.check_depth(depth)
        speculative.check_params(params)
    own_context = context is None
    if context is None:
        # Room for a draft in flight too when speculating (the target verifies up to `depth` extra tokens).
        extra = depth if speculate else 0
        n_ctx = min(max(512, len(tokens) + max_tokens + 1 + extra), max(model.n_ctx_train, len(tokens) + 1))
        # load(n_ctx=...) or the fitted size: the caller chose it (for memory), so it holds here too
        context = Context(model, n_ctx=model.default_n_ctx or n_ctx)
    elif context.model is not model:
        raise InvalidParameterError("the context belongs to another model")
    if len(tokens) >= context.n_ctx:
        held = context.n_ctx
        if own_context:
            context.close()
        raise ContextOverflowError(
            f"the prompt has {len(tokens)} tokens but the context holds {held} (and generation needs at least one "
            "more); shorten the prompt, or use a larger n_ctx (load(..., n_ctx=N) or a Context of your own)")
    sampler = drafter = rng = None
    release = hold is None  # a hold taken here is released when the steps end
    try:
        if hold is None:
            hold = GenerationHold(context)  # BusyError now, before anything changes, if the context is in use
        sampler = Sampler(model.n_vocab, params)
        if speculate:
            # Loads and checks the draft now, before any decoding: an incompatible pair raises here.
            rng = speculative.make_rng(params)
            drafter = speculative.make_drafter(context, draft, bool(lookup), params, rng)
    except BaseException:
        if sampler is not None:
            sampler.close()
        if release and hold is not None:
            hold.release()
        if own_context:
            context.close()
        raise
    if max_tokens == 0 and drafter is not None:  # plain generation (a drafter made for nothing is freed all the same)
        drafter.close()
        drafter = None
    return GenerationRequest(model, context, own_context, sampler, params, tokens, max_tokens, stops,
                             drafter=drafter, depth=depth, adaptive=bool(adaptive_depth), rng=rng,
                             hold=hold, release=release,
                             images=prompt if isinstance(prompt, ImagePrompt) else None, hooks=hooks)


class GenerationRequest:
    """A checked generation request holding its sampler (and drafter, and context when made for it). Iterate it
    as GenerationSteps (`steps`) or as (token, text, finish_reason) tuples (`token_steps`, what `generate`,
    `Chat` and the llama-cpp-python layer read: no per-token object or timing). Either prefills the prompt at
    its first step, then runs the token loop; the prompt's figures are then in `prompt_cached`, `prompt_done`
    and `prompt_tps`."""

    def __init__(self, model: Model, context: Context, own_context: bool, sampler: Sampler, params: SamplingParams,
                 tokens: list[int], max_tokens: int, stops: list[str], *, drafter: Drafter | None = None,
                 depth: int = 0, adaptive: bool = True, rng: np.random.Generator | None = None,
                 hold: GenerationHold, release: bool = True, images: ImagePrompt | None = None,
                 hooks: LogitsHooks | None = None) -> None:
        self.model, self.context, self.own_context = model, context, own_context
        self.images = images  # a prompt with images prefills itself (its images through the projector)
        self.hooks = hooks
        self.sampler, self.params = sampler, params
        self.tokens, self.max_tokens, self.stops = tokens, max_tokens, stops
        self.drafter, self.depth, self.adaptive, self.rng = drafter, depth, adaptive, rng
        self.hold, self.release = hold, release
        self.start = self.prompt_done = self.prompt_tps = 0.0
        self.prompt_cached = 0
        self.state: SequenceState | None = None
        self.source: DrawnTokens | speculative.SpeculativeTokens | None = None

    def _loop(self) -> Iterator[tuple[int, str, str | None]]:
        """Prefill the prompt (the longest cached prefix is reused; at least its last token is computed, for its
        logits, except when speculating: then the last token opens the first verification batch), then the
        token loop."""
        context, tokens = self.context, self.tokens
        perf = time.perf_counter
        self.start = start = perf()
        if self.images is not None:
            self.prompt_cached = cached = self.images.prefill(context)
            todo = tokens[cached:]
        else:
            self.prompt_cached = cached = context.reuse_prefix(tokens)
            todo = tokens[cached:-1] if self.drafter is not None else tokens[cached:]
            if todo:
                context.decode(todo)
        if self.params.uses_penalties:
            accept = self.sampler.accept
            for t in tokens:
                if t >= 0:  # not an image's placeholder
                    accept(t)
        self.prompt_done = done = perf()
        self.prompt_tps = len(todo) / max(done - start, 1e-9)
        self.state = state = SequenceState(TextAssembler(self.model.vocab, self.stops), len(tokens),
                                           self.max_tokens, context.n_ctx)
        if self.drafter is None:
            self.source = DrawnTokens(context, self.sampler, self.hooks)
        else:
            self.source = speculative.SpeculativeTokens(
                context, state, tokens, self.params, self.drafter, self.depth, self.adaptive, self.rng,
                prompt_seconds=done - start, n_computed=len(todo))
        return run(state, self.source)

    def _own(self, steps: Generator[_Step, None, None]) -> Generator[_Step, None, None]:
        return _owning(self.hold.steps(steps, self.release), self.sampler,
                       self.context if self.own_context else None, self.drafter, self.hooks)

    def steps(self) -> Generator[GenerationStep, None, None]:
        return self._own(self._steps())

    def token_steps(self) -> Generator[tuple[int, str, str | None], None, None]:
        """(token, text, finish_reason) per token."""
        return self._own(self._token_tuples())

    def _token_tuples(self) -> Generator[tuple[int, str, str | None], None, None]:
        yield from self._loop()

    def speculative_stats(self, tokens_per_s: float) -> SpeculativeStats | None:
        source = self.source
        return source.stats(tokens_per_s) if isinstance(source, speculative.SpeculativeTokens) else None

    def _steps(self) -> Generator[GenerationStep, None, None]:
        loop = self._loop()
        perf = time.perf_counter
        n_prompt, cached, prompt_tps = len(self.tokens), self.prompt_cached, self.prompt_tps
        start, prompt_done, state = self.start, self.prompt_done, self.state
        assert state is not None  # _loop made it
        for token, text, finish in loop:
            now = perf()
            generated = state.generated
            tps = generated / max(now - prompt_done, 1e-9) if generated else 0.0
            step = _new_step(token, text, finish, n_prompt, cached, generated, prompt_tps, tps, now - start)
            if finish is not None and self.drafter is not None:
                step.__dict__["speculative"] = self.speculative_stats(tps)
            yield step


def _owning(steps: Generator[_Step, None, None], sampler: Sampler, context: Context | None,
            drafter: Drafter | None = None, hooks: LogitsHooks | None = None) -> Generator[_Step, None, None]:
    """Yield the steps (run under the context's GenerationHold, see GenerationRequest._own), then free the
    sampler, a drafter, the hooks (and a context made for this call), however iteration ends, in whichever
    thread."""
    try:
        yield from steps
    finally:
        steps.close()  # gives the context back (when this call took it) before a context of its own is closed
        sampler.close()
        if hooks is not None:
            hooks.close()
        if drafter is not None:
            drafter.close()
        if context is not None:
            context.close()


_object_new = object.__new__


def _new_step(token: int, text: str, finish_reason: str | None, prompt_tokens: int, prompt_cached: int,
              generated_tokens: int, prompt_tps: float, generation_tps: float, elapsed: float) -> GenerationStep:
    """GenerationStep(...) without the frozen dataclass's __init__ (one object.__setattr__ per field, a few
    microseconds per token): the same object, fields written into its __dict__ at once."""
    step = _object_new(GenerationStep)
    step.__dict__.update(token=token, text=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                         prompt_cached=prompt_cached, generated_tokens=generated_tokens, prompt_tps=prompt_tps,
                         generation_tps=generation_tps, elapsed=elapsed, speculative=None)
    return step


def generate(model: Model, prompt: str | bytes | Sequence[int] | ImagePrompt, **kwargs: Any) -> Generation:
    """Generate and return the whole reply; takes the same keywords as `stream_generate`."""
    run = request(model, prompt, **kwargs)
    pieces, tokens = [], []
    finish = None
    for token, text, finish in run.token_steps():  # noqa: B007 - the last finish is read below
        pieces.append(text)
        tokens.append(token)
    now = time.perf_counter()
    if tokens[-1] < 0:  # max_tokens=0 (or a stopping criterion): the last step carries no token
        tokens.pop()
    tps = len(tokens) / max(now - run.prompt_done, 1e-9)
    assert finish is not None  # the last step says why generation ended
    return Generation(text="".join(pieces), tokens=tokens, finish_reason=finish, prompt_tokens=len(run.tokens),
                      prompt_tps=run.prompt_tps, generation_tps=tps, speculative=run.speculative_stats(tps))
