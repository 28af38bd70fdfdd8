"""Speculative decoding: a cheap drafter proposes tokens, the target verifies them all in one batched decode.

Two drafters: a draft model (`draft=Model | path | Context`) and prompt lookup (`lookup=True`: the tokens that
followed the latest earlier occurrence of the last few tokens). Both go through `stream_generate`/`generate`.

Guarantees:
- Greedy (temperature 0): every emitted token is the target's argmax given the tokens before it, so the
  output is the output of plain decoding, whatever the drafter proposes. (On this CPU build llama.cpp's
  logits do not depend on how tokens are split into batches, checked by the tests; a backend whose kernels
  round differently for batches of different sizes could flip a near-tie, as in llama.cpp's own speculation.)
- Sampling: the rejection rule of Leviathan et al. 2023 / Chen et al. 2023. Draft token x, drawn from the
  draft's distribution q, is accepted with probability min(1, p(x)/q(x)); on rejection a token is drawn from
  norm(max(0, p - q)); when every draft token is accepted a bonus token is drawn from p. p and q are the
  distributions after the same transforms llama.cpp's sampler chain applies (logit bias, top-k, top-p,
  min-p, temperature), computed here in numpy, with a numpy generator seeded from `seed`. So the output is
  distributed exactly as plain sampling, though a given seed gives other samples than plain sampling, and
  reproduces its own samples only at a fixed depth (adaptive_depth=False): adaptive depth follows measured
  timings, which change which positions are drafted and so the draws.
  Prompt lookup proposes deterministically: q is a point mass, x is accepted with probability p(x).
- Repetition penalties and typical sampling are refused with a draft (InvalidParameterError): their state
  depends on every accepted token and is not reproduced here.

Depth adapts (DepthController): an estimate of the per-token acceptance rate and costs measured in the
call (a drafter step, a catch-up token, a target batch of each size: the curve is learned, not assumed)
pick the number of tokens to draft that maximizes expected tokens per second, including 0: plain
decoding, during which a draft model is left out of step. Drafting runs in episodes at one depth, kept
while their measured throughput beats plain decoding's (a GPU pays for changes of batch shape, which one
round's cost does not show). Probes, and catching a draft model up, are paid from a budget of a few
percent of the time elapsed, so that a poor or costly drafter costs little.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .context import Context
from .errors import IncompatibleDraftError, InvalidParameterError
from .model import Model
from .sampling import MAX_SEED, SamplingParams

MAX_DEPTH = 64
VOCAB_CHECK_START = 5          # common/speculative.cpp compares token texts from id 5 on
VOCAB_MAX_SIZE_DIFFERENCE = 128
LOOKUP_NGRAMS = (4, 3, 2)      # n-gram sizes prompt lookup matches, longest first


@dataclass(frozen=True)
class SpeculativeStats:
    """How speculation went in one call: on the last GenerationStep and on Generation (`.speculative`)."""

    source: str                  # "draft" (a draft model) or "lookup" (prompt lookup)
    drafted: int                 # tokens the drafter proposed
    accepted: int                # proposed tokens the target accepted
    rounds: int                  # target decodes (each verifies one draft, or decodes one token when none)
    max_depth: int               # the depth asked for
    tokens_per_s: float          # generated tokens per second, drafting included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return 0.0 if not self.rounds else (self.accepted + self.rounds) / self.rounds


# ---- compatibility ----

_known_compatible: weakref.WeakKeyDictionary[Model, weakref.WeakSet[Model]] = weakref.WeakKeyDictionary()


def first_differing_token(target: Model, draft: Model) -> tuple[int, str, str] | None:
    """(id, target text, draft text) of the first token id >= 5 whose text differs, over the ids both have."""
    from ._ffi import C, ffi

    pt, pd = target.vocab._ptr, draft.vocab._ptr
    get = C.llama_vocab_get_text
    for i in range(VOCAB_CHECK_START, min(target.n_vocab, draft.n_vocab)):
        a, b = get(pt, i), get(pd, i)
        if a != b and ffi.string(a) != ffi.string(b):
            return i, ffi.string(a).decode(errors="replace"), ffi.string(b).decode(errors="replace")
    return None


def check_compatible(target: Model, draft: Model) -> None:
    """Raise IncompatibleDraftError unless `draft` can draft for `target`, as llama.cpp's
    common/speculative.cpp decides: same vocabulary type, same BOS/EOS handling, vocabulary sizes within
    128 of each other, and the same text for every token id >= 5 both have. The message names the first
    differing token whatever the first failed check was. A compatible pair is remembered."""
    from ._ffi import C

    known = _known_compatible.get(target)
    if known is not None and draft in known:
        return
    vt, vd = target.vocab, draft.vocab
    pt, pd = vt._ptr, vd._ptr
    problems = []
    if C.llama_vocab_type(pt) != C.llama_vocab_type(pd):
        kinds = {C.LLAMA_VOCAB_TYPE_SPM: "SPM", C.LLAMA_VOCAB_TYPE_BPE: "BPE", C.LLAMA_VOCAB_TYPE_WPM: "WPM",
                 C.LLAMA_VOCAB_TYPE_UGM: "UGM", C.LLAMA_VOCAB_TYPE_RWKV: "RWKV"}
        problems.append(f"tokenizer types differ (target {kinds.get(C.llama_vocab_type(pt), '?')}, draft "
                        f"{kinds.get(C.llama_vocab_type(pd), '?')})")
    for what, add, tok in (("BOS", C.llama_vocab_get_add_bos, "bos"), ("EOS", C.llama_vocab_get_add_eos, "eos")):
        if add(pt) != add(pd) or (add(pt) and getattr(vt, tok) != getattr(vd, tok)):
            problems.append(f"{what} handling differs (target adds {what}: {bool(add(pt))}, id {getattr(vt, tok)}; "
                            f"draft adds: {bool(add(pd))}, id {getattr(vd, tok)})")
    nt, nd = vt.n_tokens, vd.n_tokens
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        problems.append(f"vocabulary sizes differ by more than {VOCAB_MAX_SIZE_DIFFERENCE} (target {nt}, draft {nd})")
    differing = first_differing_token(target, draft)
    if differing is not None:
        i, a, b = differing
        problems.append(f"token {i} differs (target {a!r}, draft {b!r})")
    if problems:
        raise IncompatibleDraftError(
            f"the draft {draft.path.name} cannot draft for the target {target.path.name}: " + "; ".join(problems)
            + ". Use a draft model with the target's tokenizer (usually a smaller model of the same family), "
            "or lookup=True")
    _known_compatible.setdefault(target, weakref.WeakSet()).add(draft)


def check_params(params: SamplingParams) -> None:
    if params.uses_penalties:
        raise InvalidParameterError(
            "repetition penalties (repeat_penalty, frequency_penalty, presence_penalty) cannot be combined with "
            "speculative decoding; drop them, or the draft/lookup option")
    if not params.greedy and params.typical_p < 1.0:
        raise InvalidParameterError("typical_p cannot be combined with speculative decoding; leave typical_p=1.0 "
                                    "or drop the draft/lookup option")
    if not params.greedy and params.mirostat:
        # mirostat's target surprise adapts after every token: no fixed distribution to accept drafts against
        raise InvalidParameterError("mirostat cannot be combined with speculative decoding; use mirostat=0 or "
                                    "drop the draft/lookup option")


# ---- the target's sampling distribution, in numpy ----

class Distribution:
    """The distribution llama.cpp's sampler chain (sampling.py) samples from, for given logits.

    Same steps in the same order: logit bias, top-k, top-p (on the softmax of what top-k kept), min-p
    (logit >= max + log(min_p)), temperature, softmax. Returns (token ids, probabilities) of the tokens kept.
    """

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        bias = {t: b for t, b in dict(params.logit_bias).items() if t < n_vocab}
        self.bias_ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
        self.bias_vals = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self.log_min_p = math.log(params.min_p) if params.min_p > 0 else None

    def biased(self, logits: np.ndarray) -> np.ndarray:
        if len(self.bias_ids):
            logits = logits.copy()
            logits[self.bias_ids] += self.bias_vals
        return logits

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        logits = self.biased(logits)
        n = len(logits)
        if 0 < p.top_k < n:
            ids = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
            vals = logits[ids]
        else:
            ids, vals = np.arange(n), logits
        if p.top_p < 1.0:
            order = np.argsort(-vals, kind="stable")
            ids, vals = ids[order], vals[order]
            e = np.exp(vals - vals[0], dtype=np.float32)
            cum = np.cumsum(e / e.sum(dtype=np.float32), dtype=np.float32)
            last = int(np.searchsorted(cum, np.float32(p.top_p), side="left")) + 1
            ids, vals = ids[:last], vals[:last]
        if self.log_min_p is not None:
            keep = vals >= vals.max() + np.float32(self.log_min_p)
            ids, vals = ids[keep], vals[keep]
        v = vals.astype(np.float64) / p.temperature
        e = np.exp(v - v.max())
        return ids, e / e.sum()


def _prob(dist: tuple[np.ndarray, np.ndarray], token: int) -> float:
    ids, probs = dist
    where = np.flatnonzero(ids == token)
    return float(probs[where[0]]) if len(where) else 0.0


def _draw(rng: np.random.Generator, ids: np.ndarray, probs: np.ndarray) -> int:
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])


def _residual(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray] | int, n_vocab: int):
    """norm(max(0, p - q)): what to draw from when a draft token is rejected. q may be a point mass."""
    dense = np.zeros(n_vocab)
    dense[p[0]] = p[1]
    if isinstance(q, int):
        dense[q] = 0.0
    else:
        ids = q[0][q[0] < n_vocab]
        dense[ids] -= q[1][q[0] < n_vocab]
    np.maximum(dense, 0.0, out=dense)
    ids = np.flatnonzero(dense)
    if not len(ids):  # p == q up to rounding: rejection had probability ~0; p is the right fallback
        return p
    return ids, dense[ids]


# ---- drafters ----

class ModelDrafter:
    """Proposes tokens with a draft model, in a context of its own that mirrors the target's sequence."""

    source = "draft"

    def __init__(self, target: Context, draft, params: SamplingParams, rng) -> None:
        self._owned: list = []
        if isinstance(draft, Context):
            self.context = draft
            model = draft.model
        else:
            if isinstance(draft, Model):
                model = draft
            else:
                from .planning import load
                model = load(draft, progress=False)
                self._owned.append(model)
            self.context = None
        try:
            check_compatible(target.model, model)
            if self.context is None:
                self.context = Context(model, n_ctx=target.n_ctx, n_threads=target.n_threads)
                self._owned.insert(0, self.context)
            # Draft and target take turns on the same cores. After computing, a ggml pool's threads spin for
            # a while waiting for more work: against the other pool's working threads that made decoding up
            # to 20x slower on 2 cores. So each pool is paused (its threads sleep; the next decode wakes
            # them) before the other computes. (Sharing one pool instead leaves a pointer to the target's
            # pool cached in the draft context's CPU backend, which deadlocks once that pool is freed.)
            self._pause = _pool_pause_function()
            self._target_pools = target._pools
            self._draft_pools = self.context._pools
        except BaseException:
            self.close()
            raise
        self.model = model
        self.n_common = min(target.model.n_vocab, model.n_vocab)
        self.greedy = params.greedy
        self.dist = Distribution(params, self.n_common)
        self.rng = rng
        self.vocab = model.vocab
        self.synced = 0                  # seq[:synced] is in the draft cache, followed by `self.tail`
        self.tail: list[int] = []        # drafted tokens decoded into the draft cache after seq[:synced]
        self.catchup = (0, 0.0)          # (tokens, seconds) the last propose spent catching up with seq
        # Prior for the controller: a draft step costs about what its weights weigh against the target's.
        self.size_ratio = model.size / max(target.model.size, 1)

    def pending(self, seq: list[int]) -> int:
        """Tokens of `seq` the draft would have to decode before drafting (after plain rounds: all of them)."""
        n = self.synced
        for token in self.tail:
            if n >= len(seq) - 1 or seq[n] != token:
                break
            n += 1
        return len(seq) - n

    def _pause_pools(self, pools) -> None:
        if self._pause is not None:
            for pool in pools:
                self._pause(pool)

    def close(self) -> None:
        for obj in self._owned:
            obj.close()
        self._owned.clear()

    def propose(self, seq: list[int], k: int):
        """Up to k tokens following `seq`, and their draft distributions (None when greedy)."""
        ctx = self.context
        room = ctx.n_ctx - len(seq)
        k = min(k, room + 1)
        if k <= 0:
            return [], None
        todo = seq[self._common_prefix(seq):]
        if max(todo) >= self.model.n_vocab:  # a target-only token: the draft cannot follow this sequence
            return [], None
        self._pause_pools(self._target_pools)
        try:
            return self._draft(ctx, todo, k)
        finally:
            self._pause_pools(self._draft_pools)

    def advance(self, seq: list[int], n: int) -> tuple[int, float]:
        """Decode up to n tokens of `seq` the draft misses (never its last one) in one batch; returns
        (tokens decoded, seconds)."""
        ctx = self.context
        start = time.perf_counter()
        cached = self._common_prefix(seq)
        todo = seq[cached:min(cached + n, len(seq) - 1)]
        if not todo or max(todo) >= self.model.n_vocab:
            return 0, 0.0
        self._pause_pools(self._target_pools)
        try:
            ctx.decode(todo)
        finally:
            self._pause_pools(self._draft_pools)
        self.synced, self.tail = len(ctx.tokens), []
        return len(todo), time.perf_counter() - start

    def _common_prefix(self, seq: list[int]) -> int:
        """Keep the longest prefix of seq[:-1] the draft cache holds, drop the rest; returns its length."""
        ctx = self.context
        limit = min(len(ctx.tokens), len(seq) - 1)
        cached = min(self.synced, limit)  # known to match: start comparing there (seq only grows in a call)
        tokens = ctx.tokens
        while cached < limit and tokens[cached] == seq[cached]:
            cached += 1
        ctx.truncate(cached)
        return cached

    def _draft(self, ctx: Context, todo: list[int], k: int):
        # The tokens the draft missed are decoded as one batch (timed: the catch-up), the last one alone, as
        # the first of the steps that each decode a token and pick the next: len(drafted) steps in all.
        if len(todo) > 1:
            start = time.perf_counter()
            ctx.decode(todo[:-1])
            self.catchup = (len(todo) - 1, time.perf_counter() - start)
        else:
            self.catchup = (0, 0.0)
        ctx.decode_one(todo[-1])
        self.synced = len(ctx.tokens)
        drafted, qs = [], None if self.greedy else []
        n_common, is_eog = self.n_common, self.vocab.is_eog
        for i in range(k):
            logits = ctx.logits()[:n_common]
            if self.greedy:
                token = int(self.dist.biased(logits).argmax())
            else:
                q = self.dist(logits)
                token = _draw(self.rng, *q)
                qs.append(q)
            drafted.append(token)
            if i == k - 1 or is_eog(token):
                break
            ctx.decode_one(token)
        self.tail = drafted[:-1]
        return drafted, qs


class LookupDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n = 4, 3, 2) and
    propose the tokens that followed it (periodically continued past the end of the sequence). An index of
    n-grams is updated as the sequence grows."""

    source = "lookup"
    size_ratio = 0.0

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}   # n-gram → position right after its latest occurrence
        self.done = 0                                  # sequence positions indexed so far

    def close(self) -> None:
        pass

    def propose(self, seq: list[int], k: int):
        index = self.index
        # Register every n-gram that now has a continuation (ends before the last token).
        for j in range(max(self.done, 1), len(seq)):
            for n in LOOKUP_NGRAMS:
                if j >= n:
                    index[tuple(seq[j - n:j])] = j
        self.done = len(seq)
        for n in LOOKUP_NGRAMS:
            if len(seq) > n:
                at = index.get(tuple(seq[-n:]))
                if at is not None:
                    # What followed the match, up to the end of the sequence; past it the text since the match
                    # repeats (the match is the latest occurrence, so the sequence loops with that period).
                    # Always k tokens, so that the verification batch keeps its shape (see DepthController).
                    period = len(seq) - at
                    return [seq[at + i % period] for i in range(k)], None
        return [], None

    @property
    def model(self):
        return None

    def pending(self, seq: list[int]) -> int:
        return 0

    catchup = (0, 0.0)


_pause_function = False


def _pool_pause_function():
    """ggml_threadpool_pause of the loaded CPU backend module, or None. The CPU backend does not offer it
    through ggml_backend_reg_get_proc_address, so it is looked up in the module llmplace already loaded
    (RTLD_NOLOAD: never a second copy)."""
    global _pause_function
    if _pause_function is False:
        _pause_function = None
        try:
            import ctypes

            from ._ffi import ffi
            from .backends import backend_modules

            for module in backend_modules():
                if module.name == "cpu" and module.loaded:
                    lib = ctypes.CDLL(str(module.path), mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
                    address = ctypes.cast(lib.ggml_threadpool_pause, ctypes.c_void_p).value
                    _pause_function = ffi.cast("void (*)(struct ggml_threadpool *)", address)
        except (OSError, AttributeError):
            pass  # no pausing: correct, only slower with several threads
    return _pause_function


def make_drafter(target: Context, draft, lookup: bool, params: SamplingParams, rng):
    """The drafter for `target` (the target's context): prompt lookup or a draft model, checked now."""
    if isinstance(draft, str) and draft == "lookup":
        draft, lookup = None, True
    if draft is not None and lookup:
        raise InvalidParameterError("pass either draft= (a draft model) or lookup=True (prompt lookup), not both")
    if lookup:
        return LookupDrafter()
    if not isinstance(draft, (Model, Context, str, os.PathLike)):
        raise InvalidParameterError(f"draft must be a Model, a path to a GGUF file, a Context of the draft model or "
                                    f"'lookup', not {type(draft).__name__}")
    if isinstance(draft, Context) and draft is target:
        raise InvalidParameterError("the draft context is the target's context; give the draft a Context of its own")
    return ModelDrafter(target, draft, params, rng)


def check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise InvalidParameterError(f"depth must be an int between 1 and {MAX_DEPTH}, not {depth!r}")
    return depth


def make_rng(params: SamplingParams) -> np.random.Generator:
    seed = params.seed if params.seed is not None else random.randrange(MAX_SEED)
    return np.random.default_rng(seed)


# ---- adaptive depth ----



class DepthController:
    """Picks how many tokens to draft next, from measurements only, with a bounded cost of finding out.

    Model of a round. With per-token acceptance rate a, drafting k tokens yields E(k) = (1 - a^(k+1)) / (1 - a)
    tokens on average, for one target batch of k + 1 tokens, k drafter steps and the catch-up of tokens the
    drafter missed. Every cost is learned from this call's timings:
    - the target's batch cost curve t(n): the least of the recent samples of each size (other processes
      only ever slow a decode down; the least is the cost itself, comparable between sizes measured at
      different times of a drifting load), made non-decreasing, interpolated between measured sizes,
      extrapolated past the largest with the slope fitted over the measured sizes >= 2 (size 1 is often
      special). The shape is not assumed (flat on a GPU, nearly linear on a CPU: both are learned); until two
      sizes >= 2 are measured the slope is guessed optimistic (PRIOR_SLOPE). Depth grows at most to twice the
      largest size measured, but prompt lookup (free to propose) on a backend with warm-ups goes straight to
      what the guess favours;
    - a drafter step and a catch-up token (batched), measured; before that, t(1) (and the prompt's cost per
      token) times the draft's weight in bytes over the target's (lookup: free);
    - warm-ups: on a GPU the first two batches of a new size in a context run without, then capture, a CUDA
      graph (H100, SmolLM2-135M: 5-22 ms, then 6-11 ms, against 1.6 ms after). The context's first one-token
      decodes show whether its backend does this (`memory`, kept with the context); if so, those two rounds
      of a size are set aside from the curve, and a size not yet warm in the context carries the last
      warm-up's cost, spread over an episode, when a depth is chosen.

    Episodes. What a single round costs is not all that drafting costs: a GPU replays a captured graph only
    for the batch shape it ran the round before, and the rounds right after a drafting round pay for the
    change back (0.5-0.9 ms a change with one_cuda_graph_per_batch_shape, tools/vendor_llama_cpp.py; without
    it, 5.5 ms for a batch and back).
    So drafting runs in episodes of EPISODE drafting rounds at one depth (the last episode's, unless another
    promises STICKY times its rate), and two meters measure throughput (tokens / seconds, decayed): the
    draft regime (drafting rounds and the TAIL rounds after each) and plain decoding. An episode starts when
    the measured draft regime beats plain decoding by MARGIN, or, before any was measured, when the model of
    a round says so; at its end it goes on if the draft regime measured at least as fast as plain decoding.
    It stops early when the model, with the episode's size measured twice, says drafting loses.

    Bounded cost. `debt` adds up what the draft regime cost beyond plain decoding of the tokens it emitted
    (round seconds - tokens x t(1), plus catch-ups; negative when drafting pays). When drafting does not pay,
    a draft model is left out of step (no catch-up) and a probe episode starts every `backoff` plain rounds
    (doubled after an episode that did not pay), only if its worst round (everything rejected) keeps the debt
    within BUDGET of the seconds elapsed, the prompt included; an episode stops while the debt is over budget.
    When drafting pays but the draft model is out of step, catch_up_now() brings it back in batches the
    budget affords. A little SLACK (target steps) keeps the start of a call, when BUDGET of little is
    nothing, from stopping on one unlucky round; the first size's warm-up is not charged (an investment made
    once per context), later ones are. So a bad or costly drafter costs about BUDGET of the time of plain
    decoding, plus one warm-up. The first BASELINE rounds are plain: they measure t(1), the baseline.
    """

    DECAY = 0.9          # weight of the acceptance history per round
    PRIOR_SLOPE = 0.08   # guessed extra cost per batch token (x t(1)) until two sizes >= 2 are measured
    BUDGET = 0.04        # the most that speculation may lose, as a fraction of the seconds elapsed
    SLACK = 2.0          # ... plus this many target steps
    MARGIN = 1.03        # drafting must beat plain decoding by this factor (measurement noise)
    WINDOW = 16          # recent samples kept per cost
    WARMUP = 2.5         # a first batch of a size this many times over the prediction is a warm-up (see update)
    BASELINE = 3         # plain rounds first (a GPU's first one-token decodes run without, then capture a graph)
    EPISODE = 16         # drafting rounds an episode runs before its measured rate is judged
    TAIL = 2             # plain rounds after a drafting round that are charged to drafting (see the class)
    METER_DECAY = 0.9    # weight of the measured rates' history per round
    STICKY = 1.03        # another depth must promise this many times the rate of the last episode's

    def __init__(self, max_depth: int, adaptive: bool, draft_cost_free: bool, *, draft_size_ratio: float = 1.0,
                 memory: dict | None = None, prompt_seconds: float = 0.0,
                 prompt_seconds_per_token: float | None = None) -> None:
        self.max = max_depth
        self.adaptive = adaptive
        self.cost_free = draft_cost_free
        self.ratio = draft_size_ratio                  # prior: draft step cost / target step cost
        self.prompt_per_token = prompt_seconds_per_token
        self.acc, self.rej = 1.4, 0.6                  # prior: acceptance rate 0.7, weight 2
        self.samples: dict[int, list[float]] = {}      # batch size -> recent seconds
        # batch size -> (seconds, seconds predicted, seconds charged) of its warm-up rounds, set aside from the
        # curve (see update)
        self.warmed_up: dict[int, list[tuple[float, float, float]]] = {}
        self.step_samples: list[float] = []            # seconds per drafter step
        self.catchup_samples: list[float] = []         # seconds per token of a batched catch-up
        self._curve: dict[int, float] | None = None
        self._slope: float | None = None
        # Kept with the context across calls: {"runs": batch size -> times run in it, "warms_up": whether
        # its backend runs a new batch shape slowly at first (see update)}.
        self.memory = memory if memory is not None else {}
        self.memory.setdefault("runs", {})
        self.elapsed = prompt_seconds                  # seconds of this call so far
        self.debt = 0.0                                # seconds speculation lost against plain decoding
        self.plain_rounds = 0                          # plain rounds since the last draft or probe
        self.backoff = 4                               # plain rounds between probes
        self.depth: int | None = None                  # tokens drafted per round in the current episode
        self.last_depth: int | None = None             # ... in the last episode
        self.episode = 0                               # drafting rounds left in the current episode (0: none)
        self.since_draft: int | None = None            # rounds since the last drafting round
        # Measured throughput of each regime: decayed [seconds, tokens, rounds].
        self.meters = {"draft": [0.0, 0.0, 0.0], "plain": [0.0, 0.0, 0.0]}

    @staticmethod
    def _add(samples: list[float], value: float, window: int) -> None:
        samples.append(value)
        if len(samples) > window:
            del samples[0]

    # ---- the learned costs ----

    def _fit(self) -> None:
        est = {n: min(s) for n, s in self.samples.items()}
        running = math.inf
        for n in sorted(est, reverse=True):   # non-decreasing in n
            running = min(running, est[n])
            est[n] = running
        big = sorted(n for n in est if n >= 2)
        slope = None
        if len(big) >= 2:   # least-squares slope over the sizes >= 2
            mx = sum(big) / len(big)
            my = sum(est[n] for n in big) / len(big)
            slope = max(sum((n - mx) * (est[n] - my) for n in big) / sum((n - mx) ** 2 for n in big), 0.0)
        self._curve, self._slope = est, slope

    def verify_cost(self, size: int) -> float:
        """Seconds for a target batch of `size` tokens, from the measurements (see the class)."""
        if self._curve is None:
            self._fit()
        est = self._curve
        if size in est:
            return est[size]
        if not est:
            return 1.0
        sizes = sorted(est)
        below = [n for n in sizes if n < size]
        above = [n for n in sizes if n > size]
        if below and above:
            lo, hi = below[-1], above[0]
            return est[lo] + (est[hi] - est[lo]) * (size - lo) / (hi - lo)
        if above:                       # below every measured size: never more than the smallest
            return est[above[0]]
        top = below[-1]
        t1 = est.get(1, est[sizes[0]])
        slope = self._slope if self._slope is not None else self.PRIOR_SLOPE * t1
        return est[top] + slope * (size - top)

    def step_cost(self) -> float:
        """Seconds per drafter step (one draft decode and pick)."""
        if self.cost_free:
            return 0.0
        if self.step_samples:
            return min(self.step_samples)
        return self.ratio * self.verify_cost(1)

    def catchup_cost(self, pending: int) -> float:
        """Seconds for the drafter to decode the `pending` - 1 tokens it missed before its first step."""
        if self.cost_free or pending <= 1:
            return 0.0
        if self.catchup_samples:
            per = min(self.catchup_samples)
        elif self.prompt_per_token is not None:
            per = self.ratio * self.prompt_per_token
        else:
            per = self.step_cost()
        return per * (pending - 1)

    @property
    def acceptance(self) -> float:
        return min(self.acc / (self.acc + self.rej), 0.999)

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def _depth_rate(self, k: int, pending: int = 0, extra: float = 0.0) -> float:
        """Expected tokens per second drafting k tokens, this round's catch-up (and `extra` seconds)
        included."""
        setup = self.catchup_cost(pending) + extra
        return self.expected_tokens(k) / (setup + k * self.step_cost() + self.verify_cost(k + 1))

    def best_depth(self, limit: int, pending: int = 0) -> tuple[int, float]:
        """(k >= 1, tokens per second) of the best depth to draft under the model, this round's catch-up
        included. The depth of the last episode is kept unless another is STICKY times better: changing it
        costs a GPU a graph rebuild and capture (see _start_episode), which the model does not see."""
        rates = {}
        # A size not run in this context yet first costs its warm-up (as much over the curve as the last
        # size's warm-up was), spread over an episode.
        warmups = list(self.warmed_up.values())
        warmup = sum(s - p for s, p, _ in warmups[-1]) / self.EPISODE if warmups and self._warms_up() else 0.0
        # At most twice the largest batch measured: the curve is explored in doublings, so a guess about sizes
        # never measured costs at most one step of the curve. But prompt lookup, free to propose, on a
        # backend that warms up each new batch shape (a GPU) goes straight to what the guessed curve favours:
        # there every size explored costs a warm-up.
        grow = self.max if self.cost_free and self._warms_up() else 2 * max(self.samples, default=1) - 1
        for k in range(1, min(self.max, limit, grow) + 1):
            rates[k] = self._depth_rate(k, pending, 0.0 if self._warm(k + 1) else warmup)
        best_k = max(rates, key=rates.get)
        kept = self.last_depth
        if kept in rates and rates[kept] * self.STICKY >= rates[best_k]:
            best_k = kept
        return best_k, rates[best_k]

    # ---- decisions ----

    def _allowance(self, slack: float = 0.0) -> float:
        """Seconds speculation may still lose now: BUDGET of the time elapsed (plus `slack` seconds)."""
        return self.BUDGET * self.elapsed + slack - self.debt

    def _warms_up(self) -> bool:
        """Whether this context's backend runs a new batch shape slowly at first (CUDA: without a graph, then
        capturing one), as the first one-token decodes of the context showed (see update)."""
        return self.memory.get("warms_up", False)

    def _warm(self, size: int) -> bool:
        """Whether batches of `size` have run in this context past their warm-up (two runs)."""
        return self.memory["runs"].get(size, 0) >= 2

    def _rate(self, regime: str) -> float | None:
        """Measured tokens per second of a regime, or None while it has too few rounds to tell."""
        seconds, tokens, rounds = self.meters[regime]
        if rounds >= self.EPISODE / 2 and seconds > 0:
            return tokens / seconds
        return 1.0 / self.verify_cost(1) if regime == "plain" else None  # plain: its least cost measured so far

    def _drafting_pays(self, limit: int, margin: float) -> bool:
        """Whether drafting beats plain decoding by `margin`: measured, once a draft episode has been timed
        (its rounds and the rounds after it: what the model of single rounds cannot see); until then, as
        the model of single rounds predicts."""
        drafted = self._rate("draft")
        if drafted is not None:
            return drafted > margin * self._rate("plain")
        _, rate = self.best_depth(max(limit, 1), 2)
        return rate * self.verify_cost(1) > margin

    def choose(self, limit: int, pending: int = 0) -> int:
        """Tokens to draft next (at most `limit`); `pending`: tokens the drafter must decode before drafting
        (1 or 2 when it is in step with the sequence)."""
        if limit <= 0:
            return 0
        if not self.adaptive:
            return min(self.max, limit)
        if len(self.samples.get(1, ())) < self.BASELINE:   # the baseline first
            return 0
        t1 = self.verify_cost(1)
        k, _ = self.best_depth(limit, min(pending, 2))
        # SLACK: early in a call BUDGET of little is nothing; one unlucky round must not stop drafting that
        # the measured costs favour.
        affordable = pending <= 2 and self._allowance(self.SLACK * t1) >= 0
        if self.episode:
            # Draft through the episode while the budget affords it, and while the model of single rounds,
            # once it has measured the episode's batch size twice, does not say it loses (the
            # acceptance rate is learned within a few rounds; what the meters see takes the whole episode).
            # One depth through the episode where new batch shapes cost (see _start_episode); elsewhere the
            # depth follows the model round by round.
            hold = self.depth is not None and self._warms_up()
            depth = min(self.depth, limit) if hold else k
            if hold and depth < self.depth and not self._warm(depth + 1):
                return 0   # the end of the call cuts the depth: not worth warming up a size for a round
            measured = len(self.samples.get(depth + 1, ())) >= 2   # the least of two: past a hiccup
            if affordable and not (measured and self._depth_rate(depth, pending) * t1 < 1.0):
                if self.depth is None:
                    self.depth = self.last_depth = k
                return depth
            self._end_episode()
            return 0
        if self._drafting_pays(limit, self.MARGIN):
            if affordable:
                self._start_episode(k)
                return k
            return 0                       # out of step: catch_up_now() brings it in step as affordable
        self.plain_rounds += 1
        if self.plain_rounds < self.backoff:
            return 0
        worst = self.catchup_cost(pending) + k * self.step_cost() + self.verify_cost(k + 1) - t1
        if worst > self._allowance(0.5 * self.SLACK * t1):
            return 0
        self._start_episode(k)                      # a probe
        return k

    def _start_episode(self, depth: int | None) -> None:
        """Draft for the next EPISODE drafting rounds, at one depth (None: chosen at the episode's first
        draft): a GPU pays for each change of batch shape (0.5-0.9 ms on the H100 with SmolLM2-135M, against
        1.1 ms for a token) and for each new shape's first two runs in a context (see update)."""
        self.episode, self.plain_rounds = self.EPISODE, 0
        self.depth = depth
        if depth is not None:
            self.last_depth = depth

    def _end_episode(self) -> None:
        """Stop drafting; the next probe waits twice as long as the last."""
        self.episode, self.plain_rounds = 0, 0
        self.backoff = min(self.backoff * 2, 64)

    def catch_up_now(self, limit: int, pending: int) -> int:
        """After a plain round: how many of the `pending` tokens a draft model should decode now, in one batch,
        to get back in step: only while drafting in step would pay, and no more than the allowance pays for
        (at least 8 at a time, so that the batch's cost per token is measured for what it is). 0: none."""
        if self.cost_free or not self.adaptive or pending <= 2 or 1 not in self.samples:
            return 0
        if not self._drafting_pays(limit, self.MARGIN):
            return 0
        per = self.catchup_cost(2)
        allowance = self._allowance(self.SLACK * self.verify_cost(1))
        n = min(pending - 1, int(allowance / per) if per > 0 else pending - 1)
        return n if n >= min(8, pending - 1) else 0

    def caught_up(self, n: int, seconds: float) -> None:
        """A catch-up of `n` tokens took `seconds` (charged to speculation until drafting pays it back)."""
        if n:
            self._add(self.catchup_samples, seconds / n, self.WINDOW)
        self.elapsed += seconds
        self.debt += seconds
        self.meters["draft"][0] += seconds

    def _meter(self, regime: str, seconds: float, tokens: int) -> None:
        m, d = self.meters[regime], self.METER_DECAY
        m[0], m[1], m[2] = m[0] * d + seconds, m[1] * d + tokens, m[2] * d + 1

    def update(self, drafted: int, accepted: int, t_draft: float, t_verify: float, *, steps: int = 0,
               catchup: tuple[int, float] = (0, 0.0)) -> None:
        """Learn from one round: `drafted` tokens proposed (0: a plain round), `accepted` of them,
        seconds drafting (`catchup` included: (tokens, seconds) of it spent catching up) and verifying;
        `steps`: drafter steps taken (default `drafted`)."""
        size = drafted + 1
        t_round = t_draft + t_verify
        self.elapsed += t_round
        runs = self.memory["runs"]
        n_run = runs.get(size, 0)
        runs[size] = n_run + 1
        aside = self.warmed_up.get(size)
        # Only a batch size's first two runs in the context can be a warm-up: predict its cost for those alone.
        predicted = self.verify_cost(size) if size > 1 and n_run < 2 and 1 in self.samples else math.inf
        if size > 1 and self._warms_up() and (n_run == 0 or (n_run == 1 and aside)) \
                and t_verify > (self.WARMUP if n_run == 0 else self.WARMUP / 2) * predicted:
            # The first two batches of a new size in this context, over what the curve predicts: run without
            # a CUDA graph, then captured into one (H100, SmolLM2: 4.5-22 ms, then 6-11 ms, then 1.3-1.6 ms,
            # against 1.1 ms for one token). Neither a cost to learn nor one to hold against drafting: they
            # are charged at the predicted cost. Only the first size warmed up is free, an investment made
            # once per context: warming up more sizes is charged in full, so that what a bad drafter costs
            # stays bounded.
            first = not self.warmed_up or next(iter(self.warmed_up)) == size
            t_round = t_draft + (predicted if first else t_verify)
            self.warmed_up.setdefault(size, []).append((t_verify, predicted, t_round - t_draft))
        else:
            if aside and size not in self.samples and t_verify >= 0.9 * aside[-1][0]:
                # The cost stayed: it was the batch's cost, not a warm-up. Charge what was let off.
                self.debt += sum(seconds - charged for seconds, _, charged in aside)
            self._add(self.samples.setdefault(size, []), t_verify, self.WINDOW)
            self._curve = None
            if size == 1 and runs[1] == self.BASELINE == len(self.samples[1]):
                # The context's first one-token decodes: slow at first where the backend is.
                ones = self.samples[1]
                self.memory["warms_up"] = max(ones[:2]) > self.WARMUP * min(ones)
        if drafted:
            self.since_draft = 0
        elif self.since_draft is not None:
            self.since_draft += 1
        if drafted or (self.since_draft is not None and self.since_draft <= self.TAIL):
            # A round of the draft regime (drafting, or right after: a GPU rebuilds and replays its one-token
            # graph then): what it cost beyond plain decoding of the tokens it emitted.
            self.debt += t_round - (accepted + 1) * self.verify_cost(1)
            self._meter("draft", t_round, accepted + 1)
            if drafted and self.episode:
                self.episode -= 1
                if not self.episode:       # judge the episode by what drafting measured against plain decoding
                    if self._drafting_pays(1, 1.0):
                        self._start_episode(None)
                        self.backoff = 4
                    else:
                        self._end_episode()
        else:
            self._meter("plain", t_round, accepted + 1)
        if not drafted:
            return
        n_catchup, t_catchup = catchup
        if n_catchup > 0:
            self._add(self.catchup_samples, t_catchup / n_catchup, self.WINDOW)
        steps = steps or drafted
        if not self.cost_free:
            self._add(self.step_samples, max(t_draft - t_catchup, 0.0) / steps, self.WINDOW)
        rejected = 1 if accepted < drafted else 0
        self.acc = self.acc * self.DECAY + accepted
        self.rej = self.rej * self.DECAY + rejected


# ---- verification ----

def verify(rows: np.ndarray, drafted: Sequence[int], qs, dist: Distribution, greedy: bool, rng,
           n_vocab: int) -> list[int]:
    """The tokens the target emits for one verified draft: the accepted prefix of `drafted`, then one more
    (the correction at the first rejection, or a bonus token drawn from the last row)."""
    out: list[int] = []
    if greedy:
        if len(dist.bias_ids):
            rows[:, dist.bias_ids] += dist.bias_vals  # rows is decode_all's own copy
        best = rows.argmax(axis=1)
        for i, token in enumerate(drafted):
            if best[i] != token:
                break
            out.append(token)
        out.append(int(best[len(out)]))
        return out
    for i, token in enumerate(drafted):
        p = dist(rows[i])
        px = _prob(p, token)
        qx = 1.0 if qs is None else _prob(qs[i], token)
        if rng.random() * qx < px:
            out.append(token)
            continue
        out.append(_draw(rng, *_residual(p, token if qs is None else qs[i], n_vocab)))
        return out
    out.append(_draw(rng, *dist(rows[len(drafted)])))
    return out


def speculative_steps(model: Model, context: Context, params: SamplingParams, tokens: list[int], max_tokens: int,
                      stops: list[str], drafter, depth: int, adaptive: bool, rng):
    """The generator behind stream_generate(draft=... / lookup=True): steps exactly like plain generation's."""
    from .generation import GenerationStep, _next_text, _StopMatcher

    n_ctx = context.n_ctx
    start = time.perf_counter()
    # The target cache holds the sequence but its last token: that one opens each verification batch.
    # Reuse the longest cached prefix of the prompt, as plain generation does.
    cached = context.reuse_prefix(tokens)
    if cached < len(tokens) - 1:
        context.decode(tokens[cached:-1])
    prompt_done = time.perf_counter()
    n_computed = len(tokens) - 1 - cached
    prompt_tps = n_computed / max(prompt_done - start, 1e-9) if n_computed else 0.0

    vocab = model.vocab
    n_vocab = model.n_vocab
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = _StopMatcher(stops)
    dist = Distribution(params, n_vocab)
    greedy = params.greedy
    lookup = drafter.source == "lookup"
    control = DepthController(depth, adaptive, lookup, draft_size_ratio=drafter.size_ratio,
                              memory=context.speculation_memory, prompt_seconds=prompt_done - start,
                              prompt_seconds_per_token=(prompt_done - start) / n_computed if n_computed >= 8 else None)
    n_prompt = len(tokens)
    seq = list(tokens)
    generated = drafted_total = accepted_total = rounds = 0
    finish = None
    perf = time.perf_counter
    try:
        while finish is None:
            # Draft no more than fits in the context after the pending token, nor more than can be emitted.
            limit = min(n_ctx - len(context.tokens) - 1, max_tokens - generated - 1)
            t0 = perf()
            if lookup:
                # Prompt lookup costs nothing: look first, then let the controller pick how much to verify.
                proposal = drafter.propose(seq, min(depth, limit))[0] if limit > 0 else []
                k = control.choose(len(proposal)) if proposal else 0
                drafted, qs = proposal[:k], None
            else:
                k = control.choose(limit, drafter.pending(seq) if adaptive else 0)
                drafted, qs = drafter.propose(seq, k) if k > 0 else ([], None)
            t1 = perf()
            rows = context.decode_all([seq[-1], *drafted])
            emitted = verify(rows, drafted, qs, dist, greedy, rng, n_vocab)
            control.update(len(drafted), len(emitted) - 1, t1 - t0 if k > 0 else 0.0, perf() - t1,
                           catchup=drafter.catchup if drafted else (0, 0.0))
            if not drafted and not lookup:
                n = control.catch_up_now(limit, drafter.pending(seq) + len(emitted))
                if n:
                    control.caught_up(*drafter.advance([*seq, *emitted], n))
            rounds += 1
            drafted_total += len(drafted)
            accepted_total += len(emitted) - 1
            for token in emitted:
                generated += 1
                seq.append(token)
                text, finish = _next_text(vocab, decoder, matcher, token,
                                          generated >= max_tokens or n_prompt + generated - 1 >= n_ctx)
                now = perf()
                tps = generated / max(now - prompt_done, 1e-9)
                stats = None if finish is None else SpeculativeStats(
                    source=drafter.source, drafted=drafted_total, accepted=accepted_total, rounds=rounds,
                    max_depth=depth, tokens_per_s=tps)
                yield GenerationStep(token=token, text=text, finish_reason=finish, prompt_tokens=n_prompt,
                                     prompt_cached=cached, generated_tokens=generated, prompt_tps=prompt_tps,
                                     generation_tps=tps, elapsed=now - start, speculative=stats)
                if finish is not None:
                    break
            # Drop the rejected draft tokens (and the new pending token's slot) from the target cache.
            context.truncate(len(seq) - 1)
    finally:
        # However iteration ends, leave the cache holding a prefix of the sequence, as plain generation does.
        if not context.closed:
            context.truncate(len(seq) - 1)
