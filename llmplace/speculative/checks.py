"""What speculative decoding accepts: a draft model compatible with the target (as llama.cpp's
common/speculative.cpp decides), sampling options whose distribution it can reproduce, a depth, a seed."""

from __future__ import annotations

import random
import weakref

import numpy as np

from ..errors import IncompatibleDraftError, InvalidParameterError
from ..model import Model
from ..sampling import MAX_SEED, SamplingParams

MAX_DEPTH = 64
VOCAB_CHECK_START = 5          # common/speculative.cpp compares token texts from id 5 on
VOCAB_MAX_SIZE_DIFFERENCE = 128

_known_compatible: weakref.WeakKeyDictionary[Model, weakref.WeakSet[Model]] = weakref.WeakKeyDictionary()


def first_differing_token(target: Model, draft: Model) -> tuple[int, str, str] | None:
    """(id, target text, draft text) of the first token id >= 5 whose text differs, over the ids both have."""
    differing = target.vocab.first_text_difference(draft.vocab, VOCAB_CHECK_START)
    if differing is None:
        return None
    i, a, b = differing
    return i, a.decode(errors="replace"), b.decode(errors="replace")


def check_compatible(target: Model, draft: Model) -> None:
    """Raise IncompatibleDraftError unless `draft` can draft for `target`, as llama.cpp's
    common/speculative.cpp decides: same vocabulary type, same BOS/EOS handling, vocabulary sizes within
    128 of each other, and the same text for every token id >= 5 both have. The message names the first
    differing token whatever the first failed check was. A compatible pair is remembered."""
    known = _known_compatible.get(target)
    if known is not None and draft in known:
        return
    vt, vd = target.vocab, draft.vocab
    problems = []
    if vt.kind != vd.kind:
        problems.append(f"tokenizer types differ (target {vt.kind}, draft {vd.kind})")
    for what, adds, tok in (("BOS", "add_bos", "bos"), ("EOS", "add_eos", "eos")):
        at, ad = getattr(vt, adds), getattr(vd, adds)
        if at != ad or (at and getattr(vt, tok) != getattr(vd, tok)):
            problems.append(f"{what} handling differs (target adds {what}: {at}, id {getattr(vt, tok)}; "
                            f"draft adds: {ad}, id {getattr(vd, tok)})")
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


def check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise InvalidParameterError(f"depth must be an int between 1 and {MAX_DEPTH}, not {depth!r}")
    return depth


def make_rng(params: SamplingParams) -> np.random.Generator:
    seed = params.seed if params.seed is not None else random.randrange(MAX_SEED)
    return np.random.default_rng(seed)
