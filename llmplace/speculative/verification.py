"""Verification: the target decodes the pending token and the draft in one batch and keeps what it would have
produced itself (`verify`); `SpeculativeTokens` is the token loop's source that runs one such round per draw."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling_mirror import Distribution, draw, probability, residual
from .depth import DepthController


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
        px = probability(p, token)
        qx = 1.0 if qs is None else probability(qs[i], token)
        if rng.random() * qx < px:
            out.append(token)
            continue
        out.append(draw(rng, *residual(p, token if qs is None else qs[i], n_vocab)))
        return out
    out.append(draw(rng, *dist(rows[len(drafted)])))
    return out


class SpeculativeTokens:
    """A token source for `token_loop.run`: each draw is one round. The drafter proposes up to the depth the
    controller picks (0: a plain round), the target decodes the pending token and the draft in one batch, and
    `verify` keeps the accepted prefix plus one token of the target's own.

    The target's cache holds the sequence but its last token, which opens each verification batch: the prompt
    is prefilled without its last token, and each round begins by dropping what the last one decoded past the
    sequence (rejected draft tokens, the new pending token's slot); `close` does the same however the loop ends.
    """

    def __init__(self, context, state, prompt: list[int], params, drafter, depth: int, adaptive: bool, rng, *,
                 prompt_seconds: float, n_computed: int) -> None:
        self.context, self.state, self.params, self.drafter = context, state, params, drafter
        self.depth, self.adaptive, self.rng = depth, adaptive, rng
        self.seq = list(prompt)
        self.n_vocab = context.model.n_vocab
        self.dist = Distribution(params, self.n_vocab)
        self.lookup = drafter.source == "lookup"
        self.control = DepthController(
            depth, adaptive, self.lookup, draft_size_ratio=drafter.size_ratio, memory=context.speculation_memory,
            prompt_seconds=prompt_seconds,
            prompt_seconds_per_token=prompt_seconds / n_computed if n_computed >= 8 else None)
        self.drafted_total = self.accepted_total = self.rounds = 0

    def draw(self) -> list[int]:
        context, seq, control, drafter = self.context, self.seq, self.control, self.drafter
        context.truncate(len(seq) - 1)
        # Draft no more than fits in the context after the pending token, nor more than can be emitted.
        limit = self.state.room
        perf = time.perf_counter
        t0 = perf()
        if self.lookup:
            # Prompt lookup costs nothing: look first, then let the controller pick how much to verify.
            proposal = drafter.propose(seq, min(self.depth, limit))[0] if limit > 0 else []
            k = control.choose(len(proposal)) if proposal else 0
            drafted, qs = proposal[:k], None
        else:
            k = control.choose(limit, drafter.pending(seq) if self.adaptive else 0)
            drafted, qs = drafter.propose(seq, k) if k > 0 else ([], None)
        t1 = perf()
        rows = context.decode_all([seq[-1], *drafted])
        emitted = verify(rows, drafted, qs, self.dist, self.params.greedy, self.rng, self.n_vocab)
        control.update(len(drafted), len(emitted) - 1, t1 - t0 if k > 0 else 0.0, perf() - t1,
                       catchup=drafter.catchup if drafted else (0, 0.0))
        if not drafted and not self.lookup:
            n = control.catch_up_now(limit, drafter.pending(seq) + len(emitted))
            if n:
                control.caught_up(*drafter.advance([*seq, *emitted], n))
        self.rounds += 1
        self.drafted_total += len(drafted)
        self.accepted_total += len(emitted) - 1
        return emitted

    def advance(self, token: int, finished: bool) -> None:
        self.seq.append(token)

    def close(self) -> None:
        # However the loop ends, leave the cache holding a prefix of the sequence, as plain generation does.
        if not self.context.closed:
            self.context.truncate(len(self.seq) - 1)

    def stats(self, tokens_per_s: float) -> SpeculativeStats:
        return SpeculativeStats(source=self.drafter.source, drafted=self.drafted_total, accepted=self.accepted_total,
                                rounds=self.rounds, max_depth=self.depth, tokens_per_s=tokens_per_s)
