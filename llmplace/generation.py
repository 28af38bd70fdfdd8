"""Text generation: `stream_generate` yields one frozen `GenerationStep` per token; `generate` collects them.

Text is assembled incrementally: each token's bytes go through an incremental UTF-8 decoder, so a
character split across tokens is emitted whole, once, and the reply is never re-detokenized. Stop
strings are matched across token boundaries; text that might be the start of a stop string is held
back until it is known not to be.

The loop is the per-token hot path (DESIGN §10: a few tens of microseconds of Python per token at most):
one cached vocabulary look-up per token, the incremental decoder only while a character is split, and
`generate` and the llama-cpp-python layer read plain (token, text, finish_reason) tuples from it.
"""

from __future__ import annotations

import codecs
import dataclasses
import inspect
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from .context import Context
from .context_lock import GenerationHold
from .errors import ContextOverflowError, InvalidParameterError, unknown_keyword_error
from .model import Model
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .speculative import SpeculativeStats


@dataclass(frozen=True)
class GenerationStep:
    """One generated token and what it added to the text."""

    token: int
    text: str                    # new text (may be "" while a multi-byte character or a possible stop string is pending)
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


class _StopMatcher:
    """Holds back text that could be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        # Finds a character that begins some stop string. Text without one, while nothing is held back, can
        # neither hold a stop string nor end with the start of one: it passes as it is.
        firsts = sorted({stop[0] for stop in self.stops})
        self._first_char = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]").search if firsts else None

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self.pending and (self._first_char is None or self._first_char(text) is None):
            return text, False
        pending = self.pending + text
        cut = -1
        for stop in self.stops:
            i = pending.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.pending = ""
            return pending[:cut], True
        # Hold back the longest end of `pending` that begins some stop string. Only a position holding a
        # stop's first character can start one, so most tokens cost one rfind per stop.
        n = len(pending)
        hold = 0
        for stop in self.stops:
            lo = n - min(len(stop) - 1, n)  # the earliest start: a held part is shorter than the stop
            if lo >= n - hold:
                continue
            first = stop[0]
            j = pending.find(first, lo)
            while 0 <= j < n - hold:
                if stop.startswith(pending[j:]):
                    hold = n - j
                    break
                j = pending.find(first, j + 1)
        if hold:
            self.pending = pending[n - hold:]
            return pending[:n - hold], False
        self.pending = ""
        return pending, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _next_text(vocab, decoder, matcher: _StopMatcher, token: int, at_limit: bool) -> tuple[str, str | None]:
    """The text `token` adds and the finish reason it causes (None: generation goes on). at_limit: this is the
    last token max_tokens or the context allows. Shared by plain and speculative generation, so that both
    assemble text and end in exactly the same way."""
    if vocab.is_eog(token):
        return decoder.decode(b"", final=True) + matcher.flush(), "stop"
    text, hit = matcher.feed(decoder.decode(vocab.piece(token)))
    if hit:
        return text, "stop"
    if at_limit:
        tail, hit = matcher.feed(decoder.decode(b"", final=True))
        return text + (tail if hit else tail + matcher.flush()), "stop" if hit else "length"
    return text, None


def _prompt_tokens(model: Model, prompt: str | bytes | Sequence[int], add_special: bool) -> list[int]:
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


def stream_generate(model: Model, prompt: str | bytes | Sequence[int], *, max_tokens: int = 256,
                    stop: str | Sequence[str] = (), sampling: SamplingParams | None = None,
                    context: Context | None = None, add_special: bool = True, draft=None, depth: int = 5,
                    lookup: bool = False, adaptive_depth: bool = True, **sampling_kwargs
                    ) -> Iterator[GenerationStep]:
    """Generate from `prompt` (text or token ids), yielding one GenerationStep per token.

    Sampling options (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
    presence_penalty, penalty_last_n, seed, logit_bias) are keywords, or one `sampling=SamplingParams(...)`.
    context: reuse a Context (its cached prefix of the prompt is not recomputed); by default a temporary
    one sized for prompt + max_tokens is made. Special tokens in text prompts (e.g. '<|im_start|>') are parsed.

    Speculative decoding (see llmplace/speculative.py): draft= a draft Model, a GGUF path, a Context of the
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
    return _setup(model, prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, context=context,
                  add_special=add_special, draft=draft, depth=depth, lookup=lookup, adaptive_depth=adaptive_depth,
                  **sampling_kwargs).steps()


_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _setup(model: Model, prompt: str | bytes | Sequence[int], *, max_tokens: int = 256,
           stop: str | Sequence[str] = (), sampling: SamplingParams | None = None, context: Context | None = None,
           add_special: bool = True, draft=None, depth: int = 5, lookup: bool = False, adaptive_depth: bool = True,
           hold: GenerationHold | None = None, **sampling_kwargs) -> _Run:
    """stream_generate's checks and resources (sampler, drafter, a context when none is given, the hold on the
    context), as a _Run. hold: a GenerationHold the caller took on `context` (Chat, Llama: they hold the
    context across their own clean-up and release it themselves)."""
    unknown = set(sampling_kwargs) - _SAMPLING_NAMES
    if unknown:
        # otherwise SamplingParams(**...) raises a TypeError naming that internal class, not the typo's fix
        own = set(inspect.signature(_setup).parameters) - {"model", "prompt", "sampling_kwargs", "hold"}
        raise unknown_keyword_error("generate/stream_generate", unknown, own | _SAMPLING_NAMES)
    if sampling is not None and sampling_kwargs:
        raise InvalidParameterError("pass sampling options either as sampling=SamplingParams(...) or as keywords, not both")
    params = sampling or SamplingParams(**sampling_kwargs)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise InvalidParameterError(f"max_tokens must be an int >= 0, not {max_tokens!r}")
    stops = [stop] if isinstance(stop, str) else list(stop)
    tokens = _prompt_tokens(model, prompt, add_special)
    speculate = draft is not None or bool(lookup)
    if speculate:
        from . import speculative

        speculative.check_depth(depth)
        speculative.check_params(params)
    own_context = context is None
    if own_context:
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
    sampler = drafter = None
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
    if drafter is None or max_tokens == 0:  # plain generation (a drafter made for nothing is freed all the same)
        return _Run(model, context, own_context, sampler, params, tokens, max_tokens, stops, drafter,
                    hold=hold, release=release)
    return _Run(model, context, own_context, sampler, params, tokens, max_tokens, stops, drafter,
                lambda: speculative.speculative_steps(model, context, params, tokens, max_tokens, stops, drafter,
                                                      depth, bool(adaptive_depth), rng), hold=hold, release=release)


class _Run:
    """A checked generation request holding its sampler (and drafter, and context when made for it): iterate
    it as GenerationSteps (`steps`) or as (token, text, finish_reason) tuples (`token_steps`, what `generate`
    and the llama-cpp-python layer read: no per-token object or timing)."""

    def __init__(self, model: Model, context: Context, own_context: bool, sampler: Sampler, params: SamplingParams,
                 tokens: list[int], max_tokens: int, stops: list[str], drafter=None, speculative_steps=None, *,
                 hold: GenerationHold, release: bool = True) -> None:
        self.model, self.context, self.own_context, self.sampler, self.params = model, context, own_context, sampler, params
        self.tokens, self.max_tokens, self.stops = tokens, max_tokens, stops
        self.drafter, self.speculative_steps = drafter, speculative_steps
        self.hold, self.release = hold, release

    def _own(self, steps):
        return _owning(self.hold.steps(steps, self.release), self.sampler,
                       self.context if self.own_context else None, self.drafter)

    def steps(self) -> Iterator[GenerationStep]:
        if self.speculative_steps is not None:
            return self._own(self.speculative_steps())
        return self._own(_token_steps(self.model, self.context, self.sampler, self.params, self.tokens,
                                      self.max_tokens, self.stops, as_steps=True))

    def token_steps(self, stats: list | None = None) -> Iterator[tuple[int, str, str | None]]:
        """(token, text, finish_reason) per token; `stats` (plain generation only) receives [start,
        prompt_done, prompt_cached, prompt_tps] before the first one."""
        if self.speculative_steps is not None:
            return ((step.token, step.text, step.finish_reason) for step in self.steps())
        return self._own(_token_steps(self.model, self.context, self.sampler, self.params, self.tokens,
                                      self.max_tokens, self.stops, stats))


def _owning(steps: Iterator[GenerationStep], sampler: Sampler, context: Context | None,
            drafter=None) -> Iterator[GenerationStep]:
    """Yield the steps (run under the context's GenerationHold, see _Run._own), then free the sampler, a
    drafter (and a context made for this call), however iteration ends, in whichever thread."""
    try:
        yield from steps
    finally:
        steps.close()  # gives the context back (when this call took it) before a context of its own is closed
        sampler.close()
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


def _token_steps(model: Model, context: Context, sampler: Sampler, params: SamplingParams, tokens: list[int],
                 max_tokens: int, stops: list[str], stats: list | None = None, as_steps: bool = False
                 ) -> Iterator[tuple[int, str, str | None]] | Iterator[GenerationStep]:
    """The plain generation loop: per token, (token, text it adds, finish reason) as `_next_text` assembles
    them, or with as_steps=True a GenerationStep. `stats` receives [start, prompt_done, prompt_cached,
    prompt_tps] before the first token.

    Runs under a GenerationHold on the context (one use of it per step). Per token: one sampler call, one
    cached vocabulary look-up, one decode.
    A piece that is whole UTF-8 while no character is pending skips the incremental decoder (whose result
    would be the same); with no stop strings the matcher is skipped."""
    n_ctx = context.n_ctx
    perf = time.perf_counter
    start = perf()
    # Reuse the longest cached prefix, but always compute at least the last prompt token (for its logits).
    cached = context.reuse_prefix(tokens)
    context.decode(tokens[cached:])
    if params.uses_penalties:
        for t in tokens:
            sampler.accept(t)
    prompt_done = perf()
    n_prompt = len(tokens)
    prompt_tps = (n_prompt - cached) / max(prompt_done - start, 1e-9)
    if stats is not None:
        stats[:] = [start, prompt_done, cached, prompt_tps]
    if max_tokens <= 0:
        if as_steps:
            now = perf()
            yield _new_step(-1, "", "length", n_prompt, cached, 0, prompt_tps, 0.0, now - start)
        else:
            yield -1, "", "length"
        return

    entry = model.vocab.generation_entry
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decode = decoder.decode
    partial = False  # the decoder holds the first bytes of a character
    matcher = _StopMatcher(stops)
    feed = matcher.feed if matcher.stops else None
    first_char = matcher._first_char
    sample = sampler.sample
    decode_one = context._decode_one
    generated = 0
    finish = None
    while finish is None:
        token = sample(context)
        generated += 1
        eog, data, text = entry(token)
        if eog:
            text = decode(b"", final=True) if partial else ""
            if feed is not None:
                text += matcher.flush()
            finish = "stop"
        else:
            if partial or text is None:
                text = decode(data)
                partial = bool(decoder.getstate()[0])
            if feed is not None and (matcher.pending or first_char(text) is not None):
                text, hit = feed(text)
                if hit:
                    finish = "stop"
            if finish is None:
                if generated >= max_tokens or len(context.tokens) >= n_ctx:
                    tail = decode(b"", final=True) if partial else ""
                    finish = "length"
                    if feed is not None:
                        tail, hit = feed(tail)
                        if hit:
                            finish = "stop"
                        else:
                            tail += matcher.flush()
                    text += tail
                else:
                    decode_one(token)
        if as_steps:
            now = perf()
            yield _new_step(token, text, finish, n_prompt, cached, generated, prompt_tps,
                            generated / max(now - prompt_done, 1e-9), now - start)
        else:
            yield token, text, finish


def generate(model: Model, prompt: str | bytes | Sequence[int], **kwargs) -> Generation:
    """Generate and return the whole reply; takes the same keywords as `stream_generate`."""
    run = _setup(model, prompt, **kwargs)
    if run.speculative_steps is not None:
        pieces, tokens = [], []
        last = None
        for step in run.steps():
            pieces.append(step.text)
            if step.token >= 0:
                tokens.append(step.token)
            last = step
        return Generation(text="".join(pieces), tokens=tokens, finish_reason=last.finish_reason,
                          prompt_tokens=last.prompt_tokens, prompt_tps=last.prompt_tps,
                          generation_tps=last.generation_tps, speculative=last.speculative)
    stats: list = []
    pieces, tokens = [], []
    finish = None
    for token, text, finish in run.token_steps(stats):
        pieces.append(text)
        tokens.append(token)
    now = time.perf_counter()
    if tokens[-1] < 0:  # max_tokens=0: the one step carries no token
        tokens.pop()
    _, prompt_done, _, prompt_tps = stats
    return Generation(text="".join(pieces), tokens=tokens, finish_reason=finish, prompt_tokens=len(run.tokens),
                      prompt_tps=prompt_tps, generation_tps=len(tokens) / max(now - prompt_done, 1e-9))
