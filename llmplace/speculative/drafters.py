"""Drafters: what proposes tokens for the target to verify. A draft model (`ModelDrafter`), or prompt lookup
(`LookupDrafter`)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from ..backends import cpu_threadpool_pause
from ..context import Context
from ..errors import InvalidParameterError
from ..model import Model
from ..sampling import SamplingParams
from ..sampling_mirror import Distribution, draw
from .checks import check_compatible

if TYPE_CHECKING:
    import numpy as np

LOOKUP_NGRAMS = (4, 3, 2)      # n-gram sizes prompt lookup matches, longest first


class ModelDrafter:
    """Proposes tokens with a draft model, in a context of its own that mirrors the target's sequence."""

    source = "draft"

    def __init__(self, target: Context, draft, params: SamplingParams, rng) -> None:
        self._owned: list = []
        context: Context | None = None  # a context of the draft's own is made once the pair is checked
        if isinstance(draft, Context):
            context = draft
            model = draft.model
        else:
            if isinstance(draft, Model):
                model = draft
            else:
                from ..planning import load
                model = load(draft, progress=False)
                self._owned.append(model)
        try:
            check_compatible(target.model, model)
            if context is None:
                context = Context(model, n_ctx=target.n_ctx, n_threads=target.n_threads)
                self._owned.insert(0, context)
            self.context = context
            # Draft and target take turns on the same cores. After computing, a ggml pool's threads spin for
            # a while waiting for more work: against the other pool's working threads that made decoding up
            # to 20x slower on 2 cores. So each pool is paused (its threads sleep; the next decode wakes
            # them) before the other computes. (Sharing one pool instead leaves a pointer to the target's
            # pool cached in the draft context's CPU backend, which deadlocks once that pool is freed.)
            self._pause = cpu_threadpool_pause()
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
        """Keep the longest prefix of seq[:-1] the draft cache holds, drop the rest; returns its length. Its first
        `synced` tokens are known to match (seq only grows in a call)."""
        return self.context.reuse_prefix(seq, keep_last=1, known=self.synced)

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
        drafted: list[int] = []
        qs: list[tuple[np.ndarray, np.ndarray]] | None = None if self.greedy else []
        n_common, is_eog = self.n_common, self.vocab.is_eog
        for i in range(k):
            logits = ctx.logits()[:n_common]
            if qs is None:  # greedy
                token = int(self.dist.biased(logits).argmax())
            else:
                q = self.dist(logits)
                token = draw(self.rng, *q)
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
