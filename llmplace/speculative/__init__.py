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

The package: `checks` (draft compatibility, the options speculation accepts), `drafters` (draft model, prompt
lookup), `depth` (the controller), `verification` (`verify` and the token loop's source); the numpy mirror of
the sampler chain is `llmplace.sampling_mirror`.
"""

from __future__ import annotations

from ..sampling_mirror import Distribution, draw as _draw, probability as _prob, residual as _residual
from .checks import (MAX_DEPTH, VOCAB_CHECK_START, VOCAB_MAX_SIZE_DIFFERENCE, check_compatible, check_depth,
                     check_params, first_differing_token, make_rng)
from .depth import DepthController
from .drafters import LOOKUP_NGRAMS, LookupDrafter, ModelDrafter, make_drafter
from .verification import SpeculativeStats, SpeculativeTokens, verify

__all__ = ["MAX_DEPTH", "VOCAB_CHECK_START", "VOCAB_MAX_SIZE_DIFFERENCE", "LOOKUP_NGRAMS", "SpeculativeStats",
           "SpeculativeTokens", "Distribution", "DepthController", "LookupDrafter", "ModelDrafter", "check_compatible",
           "check_depth", "check_params", "first_differing_token", "make_drafter", "make_rng", "verify",
           "_draw", "_prob", "_residual"]
