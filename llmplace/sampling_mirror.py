"""The distribution llama.cpp's sampler chain (sampling.py) draws from, computed in numpy: what speculative
decoding accepts or rejects a draft against, and draws corrections from."""

from __future__ import annotations

import math

import numpy as np

from .sampling import SamplingParams


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


def probability(dist: tuple[np.ndarray, np.ndarray], token: int) -> float:
    ids, probs = dist
    where = np.flatnonzero(ids == token)
    return float(probs[where[0]]) if len(where) else 0.0


def draw(rng: np.random.Generator, ids: np.ndarray, probs: np.ndarray) -> int:
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])


def residual(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray] | int, n_vocab: int):
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
