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

Depth adapts: an estimate of the per-token acceptance rate and measured costs (a drafted token, a target
batch of each size) pick the number of tokens to draft that maximizes expected tokens per second,
including 0 (plain decoding, with an occasional probe) so that a poor draft costs little.
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
                from .model import load
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
        limit = min(len(ctx.tokens), len(seq) - 1)
        cached = min(self.synced, limit)  # known to match: start comparing there (seq only grows in a call)
        tokens = ctx.tokens
        while cached < limit and tokens[cached] == seq[cached]:
            cached += 1
        ctx.truncate(cached)
        todo = seq[cached:]
        if max(todo) >= self.model.n_vocab:  # a target-only token: the draft cannot follow this sequence
            return [], None
        self._pause_pools(self._target_pools)
        try:
            return self._draft(ctx, todo, k)
        finally:
            self._pause_pools(self._draft_pools)

    def _draft(self, ctx: Context, todo: list[int], k: int):
        start = time.perf_counter()
        if len(todo) == 1:
            ctx.decode_one(todo[0])
        else:
            ctx.decode(todo)
        self.catchup = (len(todo) - 1, time.perf_counter() - start)  # the last one is needed to draft at all
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
    propose the tokens that followed it. An index of n-grams is updated as the sequence grows."""

    source = "lookup"

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
                    return seq[at:at + k], None
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
    """Picks how many tokens to draft next from the estimated acceptance rate and measured costs.

    With acceptance rate a, drafting k tokens yields (1 - a^(k+1)) / (1 - a) tokens on average, for k draft
    steps plus one target batch of k + 1 tokens. The k in 0..max maximizing tokens per second wins. k = 0 is
    plain decoding; then a probe (k = 1) every few rounds, spaced out further after each failed probe,
    keeps the estimate alive at a small cost.
    """

    DECAY = 0.9

    def __init__(self, max_depth: int, adaptive: bool, draft_cost_free: bool) -> None:
        self.max = max_depth
        self.adaptive = adaptive
        self.cost_free = draft_cost_free
        self.acc, self.rej = 1.4, 0.6             # prior: acceptance rate 0.7, weight 2
        self.t_verify: dict[int, float] = {}      # batch size → EMA seconds
        self.t_draft: float | None = None         # EMA seconds per drafted token
        self.t_catchup: float | None = None       # EMA seconds per token the draft decodes to catch up
        self.plain_time = 0.0                     # seconds of plain rounds since the last draft
        self.started = False                      # a draft was verified: catch-up costs count from then on
        self.plain_rounds = 0                     # plain rounds since drafting last paid or was probed
        self.backoff = 4                          # plain rounds between probes
        self.probing = False

    def _verify_cost(self, size: int) -> float:
        """Seconds for a target batch of `size` tokens: measured, else on the line through the smallest and
        largest sizes measured. With one size measured, the extra tokens of a batch are assumed to cost 10%
        of a single-token decode each (a GPU-like guess, so that drafting gets tried; measuring corrects it:
        on a CPU a batch costs nearly size x a token, and then drafting rarely pays)."""
        t = self.t_verify
        if size in t:
            return t[size]
        if not t:
            return 1.0
        lo, hi = min(t), max(t)
        if lo == hi:
            return t[lo] * (1 + 0.1 * (size - 1)) / (1 + 0.1 * (lo - 1))
        slope = max((t[hi] - t[lo]) / (hi - lo), 0.0)
        return max(t[lo] + slope * (size - lo), 1e-6)

    def choose(self, limit: int, pending: int = 0) -> int:
        """Tokens to draft next (at most `limit`); `pending`: tokens the draft must first catch up on."""
        if limit <= 0:
            return 0
        if not self.adaptive:
            return min(self.max, limit)
        a = min(self.acc / (self.acc + self.rej), 0.999)
        t1 = self._verify_cost(1)
        cd = 0.0 if self.cost_free else (self.t_draft if self.t_draft is not None else 0.25 * t1)
        # After plain rounds a draft model must first decode what it missed: on a CPU that costs about as
        # much per token as drafting, which is what makes probing an expensive draft expensive.
        # The first draft is the experiment that measures the costs: its catch-up (the prompt) is not held
        # against it.
        catchup = pending * (self.t_catchup if self.t_catchup is not None else cd) if self.started else 0.0
        best_k, best = 0, 1.0 / t1
        for k in range(1, min(self.max, limit) + 1):
            rate = (1.0 - a ** (k + 1)) / (1.0 - a) / (k * cd + catchup + self._verify_cost(k + 1))
            if rate > best:
                best_k, best = k, rate
        if best_k == 0:
            self.plain_rounds += 1
            # Probe now and then, spaced further after each failed probe, and only while catching up costs
            # under a tenth of the plain decoding done since: a bad or costly draft then costs little.
            if self.plain_rounds >= self.backoff and catchup <= 0.1 * self.plain_time:
                self.plain_rounds = 0
                self.probing = True
                return 1
        else:
            self.plain_rounds = 0
        return best_k

    def update(self, k: int, drafted: int, accepted: int, t_draft: float, t_verify: float,
               catchup: tuple[int, float] = (0, 0.0)) -> None:
        size = drafted + 1
        old = self.t_verify.get(size)
        self.t_verify[size] = t_verify if old is None else 0.8 * old + 0.2 * t_verify
        if not drafted:
            self.plain_time += t_verify
            self.probing = False
            return
        self.plain_time = 0.0
        self.started = True
        n_catchup, t_catchup = catchup
        if n_catchup > 0:
            per = t_catchup / n_catchup
            self.t_catchup = per if self.t_catchup is None else 0.8 * self.t_catchup + 0.2 * per
            t_draft -= t_catchup
        if drafted:
            per = max(t_draft, 0.0) / drafted
            self.t_draft = per if self.t_draft is None else 0.8 * self.t_draft + 0.2 * per
            rejected = 1 if accepted < drafted else 0
            self.acc = self.acc * self.DECAY + accepted
            self.rej = self.rej * self.DECAY + rejected
            if self.probing:
                self.backoff = min(self.backoff * 2, 64) if rejected else 4
        self.probing = False


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
    control = DepthController(depth, adaptive, drafter.source == "lookup")
    n_prompt = len(tokens)
    seq = list(tokens)
    generated = drafted_total = accepted_total = rounds = 0
    finish = None
    perf = time.perf_counter
    try:
        while finish is None:
            # Draft no more than fits in the context after the pending token, nor more than can be emitted.
            k = control.choose(min(n_ctx - len(context.tokens) - 1, max_tokens - generated - 1),
                               drafter.pending(seq) if adaptive else 0)
            t0 = perf()
            drafted, qs = drafter.propose(seq, k) if k > 0 else ([], None)
            t1 = perf()
            rows = context.decode_all([seq[-1], *drafted])
            emitted = verify(rows, drafted, qs, dist, greedy, rng, n_vocab)
            control.update(k, len(drafted), len(emitted) - 1, t1 - t0, perf() - t1,
                           drafter.catchup if drafted else (0, 0.0))
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
