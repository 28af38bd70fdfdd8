"""create_completion for llmplace.Llama: the prompt tokens llama-cpp-python would build, generation, and the
`text_completion` dicts (whole, or as stream chunks).

Generation goes through `llmplace.stream_generate` on the Llama's persistent Context (its cached prompt
prefix is reused, text is assembled incrementally). Only when a call needs each token's logits before the
draw (logits processors, stopping criteria, logprobs) does a second loop here run, which reads and may
rewrite the logits in llama.cpp's buffer before the same sampler chain draws from them.
"""

from __future__ import annotations

import random
import time
import uuid
import warnings
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..c_values import INT32, integer
from ..chat_tools import ToolCallGrammar
from ..context_lock import GenerationHold
from ..errors import ContextOverflowError, InvalidParameterError
from ..generation import request
from ..images import ImagePrompt
from ..sampling import Sampler, SamplingParams
from ..text_assembly import TextAssembler
from ..token_loop import DrawnTokens, LogitsHooks, SequenceState, run
from .errors import UnsupportedFeatureError
from .llama_cache import longest_token_prefix
from .llama_grammar import GrammarConstraint

if TYPE_CHECKING:
    from .llama import Llama

_NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: "pick a random seed"


# ---- prompt ----
def _or_minus_one(token: int | None) -> int:
    """llama-cpp-python's -1 for a special token the model does not have."""
    return -1 if token is None else token


def build_prompt(llama: Llama, prompt, suffix: str | None) -> tuple[list[int], str | None]:
    """The prompt tokens llama-cpp-python 0.3.36 builds, and the suffix to append to the text when the model
    has no fill-in-the-middle tokens (None otherwise). A prompt with images (an llmplace.images.ImagePrompt, what
    the multimodal chat handlers pass) is used as its projector tokenized it."""
    if isinstance(prompt, ImagePrompt):
        if suffix is not None:
            raise InvalidParameterError("suffix cannot be combined with a prompt with images")
        return list(prompt.tokens), None
    vocab = llama._model.vocab
    is_text = isinstance(prompt, str)
    if not is_text and (isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__")):
        raise InvalidParameterError(f"prompt must be a str or a list of token ids, not {type(prompt).__name__}")
    bos, eos = llama.token_bos(), llama.token_eos()
    cls, sep = _or_minus_one(vocab.cls), _or_minus_one(vocab.sep)
    fim = [_or_minus_one(token) for token in vocab.fim_tokens]
    # llama-cpp-python 0.3.36 uses token 0 for all three FIM markers (a placeholder, "TODO: Fix" upstream);
    # llmplace uses the model's real ones, and appends the suffix to the text when the model has none.
    use_fim = suffix is not None and min(fim) >= 0
    plain_tokens = not is_text and suffix is None
    bos_tokens = ([] if plain_tokens or not vocab.add_bos or (cls if cls != -1 else bos) == -1
                  else [cls if cls != -1 else bos])
    eos_tokens = ([] if plain_tokens or (not vocab.add_eos and sep == -1)
                  else [sep if sep != -1 else eos])
    if is_text:
        body = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=not use_fim) if prompt else []
    else:
        body = [int(t) for t in prompt]
    if use_fim:
        pre, suf, mid = fim
        suffix_tokens = [suf] + (llama.tokenize(suffix.encode("utf-8"), add_bos=False, special=False) if suffix else [])
        body = (suffix_tokens + [pre] + body if llama.spm_infill else [pre] + body + suffix_tokens) + [mid]
    tokens = bos_tokens + body + eos_tokens
    if not tokens:
        if bos < 0:
            raise InvalidParameterError("the prompt is empty and this model has no BOS token to start from: "
                                        "give at least one character or token")
        tokens = [bos]
    if tokens[:2] == [bos, bos]:
        warnings.warn(f'Detected duplicate leading "{vocab.token_text(bos)}" in prompt, this will likely reduce '
                      "response quality, consider removing it...", RuntimeWarning, stacklevel=4)
    return tokens, (suffix if suffix is not None and not use_fim else None)


# ---- sampling ----
def next_seed(llama: Llama, seed: int | None) -> int | None:
    """llama-cpp-python's seed sequence: an explicit seed sticks; otherwise each call derives the next one from
    the previous (reproducible from the constructor's seed). None means llama.cpp draws a random one."""
    llama._seed = seed if seed is not None else random.Random(llama._seed).randint(0, 2**32)
    value = int(llama._seed) & 0xFFFFFFFF  # what a uint32_t seed parameter receives
    return None if value == _NO_SEED else value


def sampling_params(llama: Llama, *, temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                    frequency_penalty, presence_penalty, seed, logit_bias, mirostat_mode=0, mirostat_tau=5.0,
                    mirostat_eta=0.1) -> SamplingParams:
    """SamplingParams giving the sampler chain llama-cpp-python builds (same samplers, same order)."""
    bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
    common = dict(repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, penalty_last_n=llama.last_n_tokens_size,
                  seed=next_seed(llama, seed), logit_bias=bias)
    if mirostat_mode and temperature > 0:
        # llama-cpp-python chains mirostat on the raw logits (no temperature; 0 stays greedy): temperature 1
        return SamplingParams(temperature=1.0, mirostat=int(mirostat_mode), mirostat_tau=float(mirostat_tau),
                              mirostat_eta=float(mirostat_eta), **common)
    if temperature < 0:  # llama-cpp-python: draw from the raw distribution, no truncation
        return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, **common)
    if temperature == 0:
        return SamplingParams(temperature=0.0, **common)
    # llama.cpp treats p >= 1 as "off" and p <= 0 as "keep one token"; SamplingParams takes (0, 1].
    def clamp(p: float) -> float:
        return min(max(float(p), 1e-9), 1.0)

    return SamplingParams(temperature=temperature, top_k=max(0, int(top_k)), top_p=clamp(top_p),
                          min_p=min(max(float(min_p), 0.0), 1.0), typical_p=clamp(typical_p), **common)


# ---- generation with per-token hooks ----
class _HookedRun:
    """Generation that exposes each token's logits before the draw (logits processors, grammar, stopping
    criteria, logprobs): the token loop over a DrawnTokens source with LogitsHooks. Same sampler chain, prefix
    reuse and text assembly as stream_generate; a new sampler chain, so that penalties see only generated tokens
    (as llama-cpp-python)."""

    def __init__(self, llama: Llama, tokens: list[int], max_tokens: int, stops: list[str], params: SamplingParams,
                 processors, criteria, keep_rows: bool, prompt_rows: bool, grammar=None,
                 images: ImagePrompt | None = None) -> None:
        self.images = images  # a prompt with images computes itself into the context (ImagePrompt.prefill)
        self.llama, self.tokens, self.max_tokens, self.stops, self.params = llama, tokens, max_tokens, stops, params
        self.hooks = LogitsHooks(processors, grammar, criteria, keep_rows)
        self.prompt_rows: np.ndarray | None = None  # row i: logits after prompt token i (echo with logprobs)
        self.want_prompt_rows = prompt_rows

    @property
    def rows(self) -> list[np.ndarray]:
        """The logits each generated token was drawn from (keep_rows)."""
        return self.hooks.rows

    def __iter__(self) -> Generator[tuple[int, str, str | None], None, None]:
        llama, tokens = self.llama, self.tokens
        ctx = llama._context()
        sampler = None
        try:
            if self.want_prompt_rows:
                if len(tokens) > ctx.n_batch:
                    raise UnsupportedFeatureError(f"echo with logprobs needs the prompt in one batch: it has "
                                                  f"{len(tokens)} tokens, n_batch is {ctx.n_batch}; create the Llama "
                                                  "with a larger n_batch")
                ctx.clear()
                self.prompt_rows = ctx.decode_all(tokens)
            elif self.images is not None:
                self.images.prefill(ctx)
            else:
                ctx.decode(tokens[ctx.reuse_prefix(tokens):])
            sampler = Sampler(llama.n_vocab(), self.params)
            state = SequenceState(TextAssembler(llama._model.vocab, self.stops), len(tokens), self.max_tokens,
                                  ctx.n_ctx)
            yield from run(state, DrawnTokens(ctx, sampler, self.hooks))
        finally:
            if sampler is not None:
                sampler.close()
            self.hooks.close()


def generate_tokens(llama: Llama, tokens, params: SamplingParams, reset: bool, processors, criteria):
    """Llama.generate: yield sampled token ids without end (the caller stops); a value sent into the generator
    (a list of token ids) is decoded after the token, as in llama-cpp-python. Holds the context from the first
    step to the end (BusyError there when another generation or thread is using it)."""
    ctx = llama._context()
    yield from GenerationHold(ctx).steps(_token_ids(ctx, llama, tokens, params, reset, processors, criteria))


def _token_ids(ctx, llama: Llama, tokens, params: SamplingParams, reset: bool, processors, criteria):
    tokens = [int(t) for t in tokens]
    if reset:
        tokens = tokens[ctx.reuse_prefix(tokens):]
    if tokens:
        ctx.decode(tokens)
    sampler = Sampler(llama.n_vocab(), params)
    # The token source of the token loop, drawn step by step: this API has no end, no text and no limit.
    source = DrawnTokens(ctx, sampler, LogitsHooks(processors or None, criteria=criteria or None))
    try:
        while True:
            drawn = source.draw()
            if drawn is None:  # a stopping criterion
                return
            token = drawn[0]
            more = yield token
            ctx.decode([token, *map(int, more)] if more else [token])
    finally:
        sampler.close()


# ---- logprobs ----
def _logprobs(llama: Llama, entries: list[tuple[int, np.ndarray | None]], base_offset: int, n_top: int,
              first_null: bool = False) -> dict:
    """llama-cpp-python's CompletionLogprobs for (token, logits it was drawn from) pairs."""
    def piece(t: int) -> bytes:
        return llama.detokenize([t])

    bos = llama.token_bos()
    tokens: list[str] = []
    offsets: list[int] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    consumed = b""
    for token, row in entries:
        data = piece(token)
        if token == bos:  # as llama-cpp-python, BOS is left out of logprobs (its bytes still count for offsets)
            consumed += data
            continue
        text = data.decode("utf-8", errors="ignore")
        offsets.append(base_offset + len(consumed.decode("utf-8", errors="ignore")))
        consumed += data
        tokens.append(text)
        if row is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        logprobs = llama.logits_to_logprobs(row)
        top = {}
        if n_top > 0:
            best = np.argpartition(-logprobs, min(n_top, len(logprobs) - 1))[:n_top]
            for i in best[np.argsort(-logprobs[best], kind="stable")]:
                top[piece(int(i)).decode("utf-8", errors="ignore")] = float(logprobs[i])
        top[text] = float(logprobs[token])
        token_logprobs.append(float(logprobs[token]))
        top_logprobs.append(top)
    if first_null and token_logprobs:
        token_logprobs[0] = None
        top_logprobs[0] = None
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}


# ---- create_completion ----
def create(llama: Llama, prompt, *, suffix, max_tokens, temperature, top_p, min_p, typical_p, logprobs, echo, stop,
           frequency_penalty, presence_penalty, repeat_penalty, top_k, stream, seed, mirostat_mode, model,
           stopping_criteria, logits_processor, grammar, logit_bias, mirostat_tau=5.0, mirostat_eta=0.1):
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidParameterError(f"suffix must be a str or None, not {type(suffix).__name__}")
    ctx = llama._context()
    # The context is taken first: a second caller (another thread, or a stream of this one not finished) gets
    # BusyError before anything changes (the seed sequence, the cache, the KV cache under the first call).
    hold = GenerationHold(ctx)
    try:
        return _create(llama, ctx, hold, prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature,
                       top_p=top_p, min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop,
                       frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                       repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed,
                       mirostat_mode=mirostat_mode, model=model, stopping_criteria=stopping_criteria,
                       logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias,
                       mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta)
    except BaseException:
        hold.release()
        raise


def _create(llama: Llama, ctx, hold: GenerationHold, prompt, *, suffix, max_tokens, temperature, top_p, min_p,
            typical_p, logprobs, echo, stop, frequency_penalty, presence_penalty, repeat_penalty, top_k, stream, seed,
            mirostat_mode, model, stopping_criteria, logits_processor, grammar, logit_bias, mirostat_tau,
            mirostat_eta):
    """create_completion under `hold`: a stream releases it when it ends (or is closed or collected), a whole
    completion when its dict is made (after the state is saved to the cache)."""
    tokens, text_suffix = build_prompt(llama, prompt, suffix)
    images = prompt if isinstance(prompt, ImagePrompt) else None
    if images is not None and echo:
        raise InvalidParameterError("echo cannot repeat a prompt with images as text; call without echo=True")
    n_ctx = ctx.n_ctx
    if len(tokens) >= n_ctx:
        raise ContextOverflowError(f"Requested tokens ({len(tokens)}) exceed context window of {n_ctx}")
    if max_tokens is not None:
        max_tokens = integer("max_tokens", max_tokens, -INT32[1], INT32[1], " or None (up to the context's end)")
    if logprobs is not None:
        # OpenAI clients send logprobs=True; llama-cpp-python reads a bool as 0 or 1 top entries
        logprobs = integer("logprobs", int(logprobs) if isinstance(logprobs, bool) else logprobs, 0, INT32[1],
                           " (how many top tokens to list) or None")
    if max_tokens is None or max_tokens <= 0:  # unlimited: up to the end of the context
        max_tokens = n_ctx - len(tokens)
    max_tokens = min(max_tokens, n_ctx - len(tokens))
    stops = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
    if logprobs is not None and not llama._logits_all:
        raise InvalidParameterError("logprobs is not supported for models created with logits_all=False")
    if llama.cache is not None and images is None:  # a cached state never holds an image's placeholders
        _restore_from_cache(llama, ctx, tokens)
    params = sampling_params(llama, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             typical_p=typical_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, seed=seed, logit_bias=logit_bias,
                             mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta)
    # Repetition penalties go through this module's loop too: llama-cpp-python penalizes only generated tokens,
    # stream_generate (as llama.cpp's server) the prompt's as well.
    hooked = (logprobs is not None or bool(logits_processor) or bool(stopping_criteria) or grammar is not None
              or params.uses_penalties)
    if hooked:
        # Built now, so that a grammar llama.cpp rejects raises at the call, streaming or not.
        # A ready constraint (chat_tools.ToolCallGrammar: the lazy tool-call grammar of a chat request) is used
        # as it is.
        constraint = (grammar if isinstance(grammar, ToolCallGrammar) else
                      GrammarConstraint(llama._model, grammar) if grammar is not None else None)
        run = _HookedRun(llama, tokens, max_tokens, stops, params, logits_processor or None, stopping_criteria or None,
                         keep_rows=logprobs is not None, prompt_rows=logprobs is not None and echo and not stream,
                         grammar=constraint, images=images)
        steps: Iterator[tuple[int, str, str | None]] = hold.steps(iter(run), release=False)
    else:
        run = None
        # mirostat's feedback does not fit speculative acceptance: a mirostat request decodes plainly
        speculation = (llama._speculation or {}) if not params.mirostat and images is None else {}
        # stream_generate's request, read as (token, text, finish_reason) tuples: no per-token step object.
        prompt_in = images if images is not None else tokens
        steps = request(llama._model, prompt_in, max_tokens=max_tokens, stop=stops, sampling=params, context=ctx,
                        hold=hold, **speculation).token_steps()
    info = {"id": f"cmpl-{uuid.uuid4()}", "created": int(time.time()),
            "model": model if model is not None else llama.model_path}
    if stream:
        return _chunks(llama, steps, run, info, logprobs, prompt, tokens, hold)
    try:
        return _whole(llama, steps, run, info, tokens, prompt, logprobs, echo, text_suffix)
    finally:
        hold.release()


def _restore_from_cache(llama: Llama, ctx, tokens: list[int]) -> None:
    """Load the cached state sharing the longest prefix with the prompt, when it shares more than the context."""
    cache = llama.cache
    assert cache is not None  # the caller checked
    try:
        item = cache[tokens]
    except KeyError:
        return
    cached = longest_token_prefix(item.input_ids[:item.n_tokens].tolist(), tokens)
    if cached > longest_token_prefix(ctx.tokens, tokens):
        try:
            llama._restore(ctx, item)  # the completion holds the context already
        except InvalidParameterError as exc:  # llama.cpp refused the state (a forged or foreign cache entry)
            from .llama_cache import forget_unusable_state

            # a cache is an optimization: warn, drop the entry, compute the prompt (the load cleared the context)
            forget_unusable_state(cache, item, exc)


def _save_to_cache(llama: Llama, prompt_tokens: list[int], tokens: list[int]) -> None:
    if llama.cache is not None:
        llama.cache[prompt_tokens + tokens] = llama.save_state()


def _is_end_token(llama: Llama, token: int) -> bool:
    return token < 0 or llama._model.vocab.is_eog(token)


def _whole(llama, steps, run, info, prompt_tokens, prompt, logprobs, echo, text_suffix) -> dict:
    texts, tokens = [], []
    finish = "length"
    for token, text, finish in steps:  # noqa: B007 - (token, text, finish_reason); the last finish is read below
        texts.append(text)
        tokens.append(token)
    if tokens and finish == "stop" and _is_end_token(llama, tokens[-1]):
        tokens.pop()  # the end-of-generation token is not part of the reply
    _save_to_cache(llama, prompt_tokens, tokens)
    text = "".join(texts)
    if echo:
        text = (prompt if isinstance(prompt, str) else llama.detokenize(prompt).decode("utf-8", errors="ignore")) + text
    if text_suffix is not None:
        text += text_suffix
    choice_logprobs = None
    if logprobs is not None:
        entries = list(zip(tokens, run.rows))
        if echo:
            rows = run.prompt_rows
            prompt_entries = [(t, rows[i - 1] if i > 0 else None) for i, t in enumerate(prompt_tokens)]
            choice_logprobs = _logprobs(llama, prompt_entries + entries, 0, logprobs, first_null=True)
        else:
            choice_logprobs = _logprobs(llama, entries, len(prompt), logprobs)
    return {"id": info["id"], "object": "text_completion", "created": info["created"], "model": info["model"],
            "choices": [{"text": text, "index": 0, "logprobs": choice_logprobs, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt_tokens), "completion_tokens": len(tokens),
                      "total_tokens": len(prompt_tokens) + len(tokens)}}


def _chunks(llama, steps, run, info, logprobs, prompt, prompt_tokens, hold: GenerationHold) -> Iterator[dict]:
    """The stream's chunks; the context is given back when it ends, is closed, or is collected unstarted."""
    try:
        yield from _chunk_steps(llama, steps, run, info, logprobs, prompt, prompt_tokens)
    finally:
        steps.close()
        hold.release()


def _chunk_steps(llama, steps, run, info, logprobs, prompt, prompt_tokens) -> Iterator[dict]:
    cid, created, model = info["id"], info["created"], info["model"]

    def chunk(text, chunk_logprobs, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": chunk_logprobs, "finish_reason": finish}]}

    finish = "length"
    tokens: list[int] = []
    append = tokens.append
    if logprobs is None:
        for token, text, finish in steps:  # noqa: B007 - (token, text, finish_reason); the last finish is read below
            if text:
                yield {"id": cid, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}
            append(token)
    else:
        offset = len(prompt)
        for token, text, finish in steps:
            append(token)
            if finish == "stop" and _is_end_token(llama, token):
                if text:
                    yield chunk(text, None, None)
                continue
            entry = _logprobs(llama, [(token, run.rows[-1])], offset, logprobs)
            offset += len(text)
            yield chunk(text, entry, None)
    if llama.cache is not None:
        if tokens and finish == "stop" and _is_end_token(llama, tokens[-1]):
            tokens.pop()
        _save_to_cache(llama, prompt_tokens, tokens)
    yield chunk("", None, finish)
