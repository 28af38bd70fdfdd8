"""Sampling: validated parameters compiled into one llama.cpp sampler chain.

A chain (never a bare sampler: `llama_sampler_sample` on a bare sampler allocates a vocabulary-sized
buffer per call) in llama.cpp's usual order: logit bias → penalties → top-k → typical → top-p → min-p →
temperature → draw. Temperature 0 means greedy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ._ffi import C, ffi
from ._handle import NativeObject
from .c_values import INT32, integer, token_id
from .errors import ClosedError, InvalidParameterError
from .native_errors import native_call

if TYPE_CHECKING:
    from .context import Context

MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "pick a random seed"
# llama.cpp allocates the penalty window up front (4 bytes a token): 2^31 is a std::bad_alloc that aborts the
# process. No context holds more tokens than this (context.MAX_N_CTX).
MAX_PENALTY_WINDOW = 1 << 24


@dataclass(frozen=True)
class SamplingParams:
    """What to sample with. Defaults are llama.cpp's command-line defaults; temperature=0 is greedy.

    top_k: keep the k most likely tokens (0 = off). top_p: nucleus, keep the most likely tokens whose
    probabilities add up to p (1 = off). min_p: drop tokens below p × the top probability (0 = off).
    typical_p: locally typical sampling (1 = off). repeat_penalty / frequency_penalty / presence_penalty
    apply to the last `penalty_last_n` tokens (-1 = the whole context, 0 = none). seed: None = random.
    logit_bias: {token id: added logit}.
    mirostat: 1 or 2 samples for a target surprise `mirostat_tau` with learning rate `mirostat_eta` instead of
    top-k/top-p/min-p/typical (0 = off); temperature=0 stays greedy.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    def __post_init__(self) -> None:
        def number(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidParameterError(f"{name} must be a finite number, not {value!r}")
            if value < low or value > high or (low_open and value == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                raise InvalidParameterError(f"{name} must be in {bound}, got {value}")

        number("temperature", self.temperature, 0.0, 100.0)
        number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        number("min_p", self.min_p, 0.0, 1.0)
        number("typical_p", self.typical_p, 0.0, 1.0, low_open=True)
        number("repeat_penalty", self.repeat_penalty, 0.0, 100.0, low_open=True)
        number("frequency_penalty", self.frequency_penalty, -100.0, 100.0)
        number("presence_penalty", self.presence_penalty, -100.0, 100.0)
        if self.mirostat not in (0, 1, 2) or isinstance(self.mirostat, bool):
            raise InvalidParameterError(f"mirostat must be 0 (off), 1 or 2, not {self.mirostat!r}")
        number("mirostat_tau", self.mirostat_tau, 0.0, 100.0)
        number("mirostat_eta", self.mirostat_eta, 0.0, 1.0)
        integer("top_k", self.top_k, 0, INT32[1], " (0 = off)")
        integer("penalty_last_n", self.penalty_last_n, -1, MAX_PENALTY_WINDOW, " (-1 = the whole context, 0 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise InvalidParameterError(f"seed must be None or an int in [0, {MAX_SEED}], not {self.seed!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidParameterError(f"logit_bias must be a dict of token id -> added logit, not "
                                        f"{type(self.logit_bias).__name__}")
        for token, bias in dict(self.logit_bias).items():
            integer("a logit_bias key", token, 0, INT32[1], " (a token id)")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
                # +inf: the chain's softmax turns it into NaN, and the draw is garbage (a grammar then refuses it)
                raise InvalidParameterError(f"logit_bias[{token}] must be a number below +inf (-inf bans the token; "
                                            f"a large value such as 100 forces it), not {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0) \
            and self.penalty_last_n != 0


class Sampler(NativeObject):
    """A native sampler chain built from SamplingParams for one model's vocabulary."""

    _closed_message = "this Sampler is closed"

    def __init__(self, n_vocab: int, params: SamplingParams | None = None, *, n_ctx: int | None = None) -> None:
        """n_ctx: the size of the context sampled from, the penalty window of penalty_last_n=-1; when not
        given, the chain is built at the first `sample`, from that context's size."""
        self.params = params = params or SamplingParams()
        for token in params.logit_bias:
            token_id("logit_bias token id", token, n_vocab)
        self._n_vocab = n_vocab
        self._early_accepts: list[int] = []  # accept() calls before a deferred chain exists
        self._built = self._released = False
        if params.penalty_last_n != -1 or not params.uses_penalties or n_ctx is not None:
            self._build(n_ctx or 0)

    def _build(self, n_ctx: int) -> None:
        params, n_vocab = self.params, self._n_vocab
        self._built = True
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = C.llama_sampler_chain_init(chain_params)
        self._own(chain, C.llama_sampler_free)
        # llama_sampler_chain_add takes ownership of each sampler.
        def add(sampler: Any) -> None:  # a llama_sampler pointer
            C.llama_sampler_chain_add(chain, sampler)

        if params.logit_bias:
            biases = ffi.new("llama_logit_bias[]", len(params.logit_bias))
            for i, (token, bias) in enumerate(params.logit_bias.items()):
                biases[i].token, biases[i].bias = token, float(bias)
            add(C.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.uses_penalties:
            # llama.cpp reads -1 as 0 (off); upstream's documented -1 is "the whole context"
            window = n_ctx if params.penalty_last_n == -1 else params.penalty_last_n
            add(C.llama_sampler_init_penalties(n_vocab, window, params.repeat_penalty,
                                               params.frequency_penalty, params.presence_penalty))
        if params.greedy:
            add(C.llama_sampler_init_greedy())
            return
        seed = params.seed if params.seed is not None else random.randrange(MAX_SEED)
        if params.mirostat:
            # as llama.cpp's own samplers chain it: temperature, then mirostat picks the token
            add(C.llama_sampler_init_temp(params.temperature))
            if params.mirostat == 1:
                add(C.llama_sampler_init_mirostat(n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
            else:
                add(C.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
            return
        if params.top_k > 0:
            add(C.llama_sampler_init_top_k(params.top_k))
        if params.typical_p < 1.0:
            add(C.llama_sampler_init_typical(params.typical_p, 1))
        if params.top_p < 1.0:
            add(C.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(C.llama_sampler_init_min_p(params.min_p, 1))
        add(C.llama_sampler_init_temp(params.temperature))
        add(C.llama_sampler_init_dist(seed))

    def _ensure_built(self, context: Context) -> None:
        if self._released:
            raise ClosedError(self._closed_message)
        self._build(context.n_ctx)
        for token in self._early_accepts:
            with self._lifetime:
                C.llama_sampler_accept(self._ptr, token)
        self._early_accepts.clear()

    def sample(self, context: Context, index: int = -1) -> int:
        """Draw the next token from the logits of output `index` of `context` (and record it for penalties)."""
        if not self._built:
            self._ensure_built(context)
        # Inside uses of both: close() of either, in another thread, waits for the draw instead of freeing
        # memory under it (and a closed one raises ClosedError here).
        with self._lifetime, context._lifetime:
            # llama.cpp asserts (ending the process) when that output has no logits: a fresh context, or an
            # index past the last decode's outputs
            index = integer("index", index, *INT32)
            native_call(C.llama_get_logits_ith, context._ptr, index, error=lambda reason: InvalidParameterError(
                f"no logits for output {index} of this context ({reason}): decode tokens first, and sample an "
                "output the last decode computed (-1: its last)"))
            token: int = C.llama_sampler_sample(self._ptr, context._ptr, index)
            return token

    def accept(self, token: int) -> None:
        """Record a token the sampler did not draw (e.g. the prompt), for repetition penalties."""
        token = token_id("token id", token, self._n_vocab)
        if not self._built:
            self._early_accepts.append(token)
            return
        with self._lifetime:
            C.llama_sampler_accept(self._ptr, token)

    def reset(self) -> None:
        if not self._built:
            self._early_accepts.clear()
            return
        with self._lifetime:
            C.llama_sampler_reset(self._ptr)

    def close(self) -> None:
        self._released = True
        super().close()
