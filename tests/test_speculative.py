"""Speculative decoding: greedy output equals plain decoding for any drafter; sampling keeps the target's
distribution; incompatible drafts are refused; llmplace.quantize makes the requantized draft."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

import llmplace
from llmplace import speculative
from llmplace._ffi import C, ffi
from llmplace.sampling import Sampler, SamplingParams

PROMPT = "The three primary colors are"
CODE_PROMPT = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "Rewrite the code above with type hints:\n\ndef add(a: int, b: int) -> int:\n    return a + b\n\n\n"
)


# ---- fixtures ----

@pytest.fixture(scope="session")
def smollm2_q4_0_path(smollm2_path, model_cache):
    """SmolLM2 requantized from Q4_1 to Q4_0 by llmplace.quantize: same tokenizer, slightly different logits."""
    return llmplace.quantize(smollm2_path, model_cache / "smollm2-q4_0.gguf", "q4_0")


@pytest.fixture(scope="session")
def smollm2_q4_0(smollm2_q4_0_path):
    with llmplace.load(smollm2_q4_0_path, progress=False) as model:
        yield model


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    with llmplace.load(tiny_llama_path, progress=False) as model:
        yield model


# One thread per context: on this shared 2-core machine two spinning threads per decode ran up to 7x slower
# than one whenever another process was busy. The draft context takes the target's thread count.
def context(model, n_ctx=512):
    return llmplace.Context(model, n_ctx=n_ctx, n_threads=1)


def plain(model, prompt, **kwargs):
    """Greedy generation in a fresh one-thread context (or the context passed)."""
    if "context" in kwargs:
        return llmplace.generate(model, prompt, temperature=0, **kwargs)
    with context(model) as ctx:
        return llmplace.generate(model, prompt, temperature=0, context=ctx, **kwargs)


# ---- greedy: identical to plain decoding, for any drafter ----

def test_greedy_with_the_target_as_its_own_draft_equals_plain_and_accepts_everything(smollm2):
    reference = plain(smollm2, PROMPT, max_tokens=40)
    result = plain(smollm2, PROMPT, max_tokens=40, draft=smollm2, depth=4, adaptive_depth=False)
    assert result.tokens == reference.tokens and result.text == reference.text
    assert result.finish_reason == reference.finish_reason == "length"
    stats = result.speculative
    assert stats.source == "draft" and stats.drafted > 20 and stats.accepted == stats.drafted
    assert stats.rounds < 40 and stats.acceptance_rate == 1.0


def test_greedy_with_a_requantized_draft_equals_plain(smollm2, smollm2_q4_0):
    for prompt in (PROMPT, "Once upon a time, in a small village,"):
        reference = plain(smollm2, prompt, max_tokens=32)
        result = plain(smollm2, prompt, max_tokens=32, draft=smollm2_q4_0, depth=5, adaptive_depth=False)
        assert result.tokens == reference.tokens and result.text == reference.text
        assert result.speculative.accepted > 0


def test_greedy_with_a_random_weight_draft_equals_plain(smollm2, tiny_llama):
    reference = plain(smollm2, PROMPT, max_tokens=24)
    result = plain(smollm2, PROMPT, max_tokens=24, draft=tiny_llama, depth=3, adaptive_depth=False)
    assert result.tokens == reference.tokens and result.text == reference.text
    assert result.speculative.drafted > 0


def test_greedy_with_prompt_lookup_equals_plain_and_accepts_on_repetitive_text(smollm2):
    reference = plain(smollm2, CODE_PROMPT, max_tokens=40)
    for kwargs in ({"lookup": True}, {"draft": "lookup"}):
        result = plain(smollm2, CODE_PROMPT, max_tokens=40, adaptive_depth=False, **kwargs)
        assert result.tokens == reference.tokens and result.text == reference.text
        assert result.speculative.source == "lookup"
        assert result.speculative.accepted >= 10


def test_prompt_lookup_proposes_what_followed_the_latest_match_continued_periodically():
    drafter = speculative.LookupDrafter()
    seq = [1, 2, 3, 4, 9, 1, 2, 3]                    # "1 2 3" occurred before, followed by 4 9 1 2 3
    assert drafter.propose(seq, 3)[0] == [4, 9, 1]
    seq = [7, 5, 6, 5, 6]                             # "5 6" last occurred two tokens back: a loop of period 2
    assert speculative.LookupDrafter().propose(seq, 5)[0] == [5, 6, 5, 6, 5]   # always k tokens: one batch shape
    assert speculative.LookupDrafter().propose([1, 2, 3, 4], 4)[0] == []      # no earlier occurrence


def test_a_context_remembers_what_speculation_learned_about_it(smollm2):
    with llmplace.Context(smollm2, n_ctx=512) as ctx:
        assert ctx.speculation_memory == {}
        plain(smollm2, CODE_PROMPT, max_tokens=20, context=ctx, lookup=True)
        memory = ctx.speculation_memory
        assert memory["runs"][1] >= speculative.DepthController.BASELINE
        assert memory["warms_up"] in (True, False)    # judged from the context's first one-token decodes
        runs = dict(memory["runs"])
        plain(smollm2, CODE_PROMPT, max_tokens=20, context=ctx, lookup=True)
        assert ctx.speculation_memory["runs"][1] > runs[1]   # the second call counts on from the first


def test_draft_given_as_a_path_is_loaded_checked_and_closed(smollm2, smollm2_q4_0_path):
    reference = plain(smollm2, PROMPT, max_tokens=12)
    result = plain(smollm2, PROMPT, max_tokens=12, draft=smollm2_q4_0_path)
    assert result.tokens == reference.tokens


def test_steps_look_like_plain_steps_and_honour_max_tokens_and_stop_strings(smollm2):
    with context(smollm2) as ctx:
        plain_steps = list(llmplace.stream_generate(smollm2, PROMPT, max_tokens=7, temperature=0, context=ctx))
        steps = list(llmplace.stream_generate(smollm2, PROMPT, max_tokens=7, temperature=0, draft=smollm2, depth=5,
                                              adaptive_depth=False, context=ctx))
    assert [s.token for s in steps] == [s.token for s in plain_steps]
    assert [s.text for s in steps] == [s.text for s in plain_steps]
    assert [s.generated_tokens for s in steps] == list(range(1, 8))
    assert [s.finish_reason for s in steps] == [None] * 6 + ["length"]
    assert all(s.speculative is None for s in steps[:-1]) and steps[-1].speculative.drafted > 0

    full = plain(smollm2, PROMPT, max_tokens=40).text
    stop = full[14:18]
    reference = plain(smollm2, PROMPT, max_tokens=40, stop=[stop])
    for kwargs in ({"draft": smollm2, "adaptive_depth": False}, {"lookup": True}):
        result = plain(smollm2, PROMPT, max_tokens=40, stop=[stop], **kwargs)
        assert result.finish_reason == "stop" and result.text == reference.text == full[:full.find(stop)]
        assert result.tokens == reference.tokens


def test_reused_contexts_keep_a_prefix_of_the_sequence_across_calls(smollm2, smollm2_q4_0):
    """What a chat does: the same target and draft contexts, a longer prompt each turn."""
    with context(smollm2) as ctx, context(smollm2_q4_0) as draft_ctx:
        first = plain(smollm2, PROMPT, max_tokens=16, context=ctx, draft=draft_ctx, adaptive_depth=False)
        prompt = smollm2.tokenize(PROMPT) + first.tokens + smollm2.tokenize(" And then", add_special=False)
        assert ctx.tokens == prompt[:len(ctx.tokens)] and len(ctx.tokens) == len(smollm2.tokenize(PROMPT)) + 15
        steps = list(llmplace.stream_generate(smollm2, prompt, max_tokens=16, temperature=0, context=ctx,
                                              draft=draft_ctx, adaptive_depth=False))
        assert steps[0].prompt_cached == len(smollm2.tokenize(PROMPT)) + 15
        assert [s.token for s in steps] == plain(smollm2, prompt, max_tokens=16).tokens
        assert not draft_ctx.closed


def test_closing_the_stream_early_leaves_a_usable_context(smollm2):
    with context(smollm2, 256) as ctx:
        stream = llmplace.stream_generate(smollm2, PROMPT, max_tokens=30, temperature=0, context=ctx,
                                          draft=smollm2, adaptive_depth=False)
        got = [next(stream).token for _ in range(3)]
        stream.close()
        sequence = smollm2.tokenize(PROMPT) + got
        assert ctx.tokens == sequence[:len(ctx.tokens)]
        again = plain(smollm2, PROMPT, max_tokens=10, context=ctx, lookup=True)
        assert again.tokens == plain(smollm2, PROMPT, max_tokens=10).tokens


def test_a_draft_context_outlives_the_target_contexts_it_served(smollm2, tiny_llama):
    """Thread pools stay per context: a draft Context used with one target context, then (after that one is
    closed) with another, must neither hang nor crash, with several threads per pool."""
    with llmplace.Context(tiny_llama, n_ctx=256, n_threads=2) as draft_ctx:
        for _ in range(2):
            with llmplace.Context(smollm2, n_ctx=256, n_threads=2) as ctx:
                result = plain(smollm2, PROMPT, max_tokens=6, context=ctx, draft=draft_ctx, adaptive_depth=False)
                assert result.speculative.drafted > 0
        draft_ctx.decode_one(1)


def test_context_limit_ends_like_plain_decoding(smollm2):
    with context(smollm2, 256) as ctx:
        words = smollm2.tokenize("red green blue " * 200, add_special=False)
        prompt = words[:ctx.n_ctx - 6]  # room for 6 more tokens: plain decoding emits 7 (the last one undecoded)
        reference = plain(smollm2, prompt, max_tokens=50, context=ctx)
        for kwargs in ({"draft": smollm2, "depth": 4}, {"lookup": True, "depth": 5}):
            result = plain(smollm2, prompt, max_tokens=50, context=ctx, adaptive_depth=False, **kwargs)
            assert result.tokens == reference.tokens and result.finish_reason == reference.finish_reason == "length"
            assert len(result.tokens) == 7


def test_adaptive_depth_drafts_little_with_a_draft_that_is_always_wrong(smollm2, tiny_llama):
    result = plain(smollm2, PROMPT, max_tokens=60, draft=tiny_llama, depth=8)
    assert result.tokens == plain(smollm2, PROMPT, max_tokens=60).tokens
    stats = result.speculative
    assert stats.accepted <= 2
    assert stats.drafted < 30, stats  # fixed depth 8 would have drafted ~8 per token


def test_adaptive_depth_catching_up_a_draft_in_batches_keeps_greedy_output(smollm2, smollm2_q4_0, monkeypatch):
    """Force the controller's favourable path (flat batch costs, free draft steps, no budget limit): the draft
    model is brought in step with ModelDrafter.advance, then drafts; the output is still plain decoding's."""
    advanced = []
    advance = speculative.ModelDrafter.advance

    def spy(self, seq, n):
        got = advance(self, seq, n)
        advanced.append(got[0])
        return got

    monkeypatch.setattr(speculative.ModelDrafter, "advance", spy)
    monkeypatch.setattr(speculative.DepthController, "BUDGET", 100.0)
    monkeypatch.setattr(speculative.DepthController, "verify_cost", lambda self, size: 1.0 if size == 1 else 1.01)
    monkeypatch.setattr(speculative.DepthController, "step_cost", lambda self: 0.0)
    reference = plain(smollm2, PROMPT, max_tokens=30)
    result = plain(smollm2, PROMPT, max_tokens=30, draft=smollm2_q4_0, depth=4)
    assert result.tokens == reference.tokens
    assert advanced and advanced[0] >= 5 and result.speculative.drafted > 10


# ---- the depth controller, on synthetic timings ----

def simulate(n_tokens, verify_cost, *, accept, step_cost=0.0, catchup_cost=0.0, lookup=False, depth=5,
             prompt_tokens=40, ratio=1.0, seed=0):
    """Drive a DepthController as SpeculativeTokens.draw does, with synthetic costs (seconds) and a drafter whose
    tokens are each accepted with probability `accept`. Returns (seconds after the prompt, depth per round)."""
    rng = random.Random(seed)
    prompt = verify_cost(prompt_tokens)
    control = speculative.DepthController(depth, True, lookup, draft_size_ratio=0.0 if lookup else ratio,
                                          prompt_seconds=prompt, prompt_seconds_per_token=prompt / prompt_tokens)
    clock, generated, depths = 0.0, 0, []
    pending = 0 if lookup else prompt_tokens + 1  # tokens the draft model has to decode before drafting
    while generated < n_tokens:
        limit = n_tokens - generated - 1
        k = control.choose(limit, pending)
        accepted, t_draft = 0, 0.0
        t_verify = verify_cost(k + 1)   # once per round: a cost model may keep state (GpuShapes)
        if k:
            t_catchup = catchup_cost * (pending - 1)
            t_draft = t_catchup + k * step_cost
            while accepted < k and rng.random() < accept:
                accepted += 1
            control.update(k, accepted, t_draft, t_verify, catchup=(pending - 1, t_catchup))
            pending = 0 if lookup else (2 if accepted == k else 1)
        else:
            control.update(0, 0, 0.0, t_verify)
            if not lookup:
                pending += 1
                n = control.catch_up_now(limit, pending)
                if n:
                    control.caught_up(n, n * catchup_cost)
                    clock += n * catchup_cost
                    pending -= n
        clock += t_draft + t_verify
        generated += accepted + 1
        depths.append(k)
    return clock, depths


def gpu_costs(n):
    """A GPU: a batch costs about as much whatever its size, more than one token (CUDA graphs serve those)."""
    return 1.35e-3 if n == 1 else 2.2e-3 + 0.02e-3 * n


def cpu_costs(n):
    """A CPU: a batch costs nearly its size times a token."""
    return 2e-3 + 18.5e-3 * n


class GpuShapes:
    """The H100 with llmplace's build of llama.cpp (one_cuda_graph_per_batch_shape), SmolLM2-135M: a context
    runs a batch shape's first decode without a CUDA graph, captures one on the second, replays it after; a
    change of shape costs a graph rebuild on the host (tools/gpu_shape_switch.py measured 1.1 ms for one
    token, 1.6 for six, 0.5-0.7 ms per change of shape)."""

    def __init__(self):
        self.previous, self.uses = None, {}

    def __call__(self, n):
        uses = self.uses[n] = self.uses.get(n, 0) + 1
        changed, self.previous = n != self.previous, n
        if uses <= 2:   # an H100 trace of a warm process (tools/spec_trace.py)
            return (5.7e-3, 6.3e-3)[uses - 1] if n > 1 else (4.5e-3, 5.7e-3)[uses - 1]
        return (1.1e-3 if n == 1 else 1.2e-3 + 0.06e-3 * n) + (0.5e-3 if changed else 0.0)


def plain_seconds(n, costs):
    return sum(costs(1) for _ in range(n))


@pytest.mark.parametrize("lookup", [True, False])
def test_depth_controller_learns_flat_batch_costs_and_drafts_deep(lookup):
    draft = {} if lookup else {"step_cost": 0.2e-3, "catchup_cost": 0.02e-3, "ratio": 0.125}
    for n in (96, 500):
        clock, depths = simulate(n, gpu_costs, accept=0.9, lookup=lookup, **draft)
        drafting = [k for k in depths if k]
        # The first episodes draft what the prior and the sizes measured so far favour (a draft model's depth
        # grows by doublings); a long call drafts the full depth.
        assert statistics.median(drafting) >= (5 if n == 500 else 3) and max(drafting) == 5, depths
        assert len(drafting) >= 0.8 * len(depths), depths
        assert n * gpu_costs(1) / clock > (2.0 if lookup else 1.5) * (0.85 if n == 96 else 1.0)


def test_depth_controller_sets_aside_the_warm_up_of_a_new_batch_size():
    """On the H100 the first 2-token batch of a context took 17 ms (kernels and graphs for the new shape), then
    1.3 ms, against 1.2 ms for one token: taken as the batch's cost, it stopped prompt lookup from drafting."""
    seen = set()

    def cold_first(n):   # one-token decodes included: the first of a context is slow too
        if n not in seen:
            seen.add(n)
            return 17e-3
        return gpu_costs(n)

    clock, depths = simulate(256, cold_first, accept=0.9, lookup=True)
    assert statistics.median([k for k in depths if k]) >= 4 and sum(1 for k in depths if k) >= 0.7 * len(depths)
    assert 256 * gpu_costs(1) / clock > 1.8


def test_depth_controller_drafts_in_episodes_of_one_batch_shape_on_a_gpu():
    """A GPU pays for each new batch shape (a decode without a graph, then a capture) and a little for each
    change of shape: speculation pays when it keeps one shape for a while, which single-round costs do not
    show; the controller drafts in episodes at one depth and judges them by their measured throughput."""
    for n in (96, 256):
        clock, depths = simulate(n, GpuShapes(), accept=0.9, lookup=True)
        assert plain_seconds(n, GpuShapes()) / clock > 1.5, depths
        assert len(set(k for k in depths if k)) <= 2, depths           # few shapes
        clock, depths = simulate(n, GpuShapes(), accept=0.5, lookup=True)
        assert plain_seconds(n, GpuShapes()) / clock > 0.95, depths
        # Always wrong: a random draft model, and prompt lookup proposing at every round (real lookup proposes
        # only where an n-gram matches). 96 tokens: the warm-up and two rounds of a probe are 12% of the call.
        for draft in ({"lookup": True}, {"step_cost": 0.05e-3, "catchup_cost": 0.005e-3, "ratio": 0.07}):
            clock, depths = simulate(n, GpuShapes(), accept=0.0, **draft)
            assert plain_seconds(n, GpuShapes()) / clock > (0.86 if n == 96 else 0.9), (draft, depths)


def test_depth_controller_decodes_plainly_with_linear_costs_and_a_costly_draft():
    for accept in (0.6, 1.0):   # a requantized draft, the target itself
        for n in (96, 500):
            clock, depths = simulate(n, cpu_costs, accept=accept, step_cost=17e-3, catchup_cost=6e-3, ratio=0.9)
            assert sum(1 for k in depths if k) <= 2, depths
            assert clock <= 1.04 * n * cpu_costs(1)


@pytest.mark.parametrize("costs", [gpu_costs, cpu_costs])
def test_depth_controller_bounds_what_a_draft_that_is_always_wrong_costs(costs):
    for draft in ({"lookup": True}, {"step_cost": 0.05 * costs(1), "catchup_cost": 0.003 * costs(1), "ratio": 0.07}):
        # At 96 tokens one probe of the full depth of prompt lookup on a CPU (a batch of 5 costs 4.6 tokens'
        # worth) is 7.5% of the call.
        for n, loss in ((96, 0.08), (500, 0.04)):
            clock, depths = simulate(n, costs, accept=0.0, **draft)
            assert clock <= (1 + loss) * n * costs(1), (draft, n, depths)


def test_depth_controller_cost_curve_is_learned_from_measurements():
    control = speculative.DepthController(8, True, True)
    assert control.choose(8) == 0                     # the first round measures plain decoding
    # The first one-token decode 5x the later ones: a backend that runs new shapes slowly at first (CUDA).
    for size, seconds in ((1, 5.0), (1, 1.1), (1, 0.9), (3, 9.0), (3, 3.0), (3, 2.0), (5, 2.4), (5, 2.2)):
        control.update(size - 1, 0, 0.0, seconds)
    assert control.memory == {"runs": {1: 3, 3: 3, 5: 2}, "warms_up": True}
    assert control.verify_cost(1) == 0.9              # the least of what was measured
    guess = pytest.approx(0.9 * (1 + 2 * control.PRIOR_SLOPE))   # size 3 before any batch is measured
    assert control.warmed_up[3] == [(9.0, guess, guess), (3.0, guess, guess)]   # warm-up, then capture
    assert control.verify_cost(3) == 2.0              # set aside: the 9.0 s of the first 3-token batch, then 3.0
    assert control.verify_cost(4) == pytest.approx(2.1)   # between measured sizes: interpolated
    assert control.verify_cost(7) == pytest.approx(2.2 + 0.1 * 2)  # past them: the slope fitted over sizes >= 2
    assert control.verify_cost(2) == pytest.approx(1.45)  # 1 and 3 measured: interpolated


# ---- sampling: the target's distribution, exactly ----

def _chain_distribution(model, params: SamplingParams, logits: np.ndarray) -> dict[int, float]:
    """What llama.cpp's own sampler chain (sampling.py) draws from: apply the chain to the logits and read the
    candidates it keeps and their normalized probabilities."""
    n = len(logits)
    data = ffi.new("llama_token_data[]", n)
    view = np.frombuffer(ffi.buffer(data), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    view["id"], view["logit"], view["p"] = np.arange(n), logits, 0
    array = ffi.new("llama_token_data_array *", {"data": data, "size": n, "selected": -1, "sorted": False})
    with Sampler(model.n_vocab, params) as sampler:
        C.llama_sampler_apply(sampler._ptr, array)
    kept = np.frombuffer(ffi.buffer(array.data, array.size * 12), dtype=view.dtype)
    return {int(t): float(p) for t, p in zip(kept["id"], kept["p"])}


@pytest.mark.parametrize("options", [{"temperature": 1.0, "top_k": 8, "top_p": 1.0, "min_p": 0.0},
                                     {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
                                     {"temperature": 1.3, "top_k": 0, "top_p": 0.8, "min_p": 0.0},
                                     {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.1,
                                      "logit_bias": {11: 3.0}}])
def test_numpy_distribution_equals_llama_cpp_sampler_chain(smollm2, options):
    params = SamplingParams(seed=1, **options)
    with context(smollm2, 128) as ctx:
        ctx.decode(smollm2.tokenize(PROMPT))
        logits = ctx.logits()
    expected = _chain_distribution(smollm2, params, logits)
    ids, probs = speculative.Distribution(params, smollm2.n_vocab)(logits)
    assert set(ids.tolist()) == set(expected)
    for token, p in zip(ids.tolist(), probs):
        assert p == pytest.approx(expected[token], rel=1e-4, abs=1e-6)


def _chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution (integer df), without scipy."""
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return math.exp(-x / 2) * total
    total, term = math.erfc(math.sqrt(x / 2)), math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    for i in range(1, (df - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return total


def _chi_square_p_value(counts: dict[int, int], expected: dict[int, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= set(expected), f"sampled tokens outside the target's support: {set(counts) - set(expected)}"
    cells, observed, rest_e, rest_o = [], [], 0.0, 0
    for token, p in expected.items():
        if n * p >= 5:
            cells.append(n * p)
            observed.append(counts.get(token, 0))
        else:
            rest_e += n * p
            rest_o += counts.get(token, 0)
    if rest_e > 0:
        cells.append(rest_e)
        observed.append(rest_o)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, cells))
    return _chi2_sf(stat, len(cells) - 1)


def test_chi_square_helper_agrees_with_known_values():
    assert _chi2_sf(24.322, 7) == pytest.approx(0.001, rel=1e-3)
    assert _chi2_sf(9.488, 4) == pytest.approx(0.05, rel=1e-3)


SAMPLE_PARAMS = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=0)


def test_acceptance_rule_reproduces_the_target_distribution(smollm2, tiny_llama, smollm2_q4_0):
    """The rejection rule alone, many times on real logits: target SmolLM2, draft distributions from the random
    llama (very different from the target: mostly rejections) and the requantized SmolLM2 (close: mostly
    acceptances), and a point mass (prompt lookup). The emitted first token must follow p exactly."""
    tokens = smollm2.tokenize(PROMPT)
    dist_t = speculative.Distribution(SAMPLE_PARAMS, smollm2.n_vocab)
    with context(smollm2, 64) as ctx:
        ctx.decode(tokens)
        p = dist_t(ctx.logits())
    expected = dict(zip(p[0].tolist(), p[1].tolist()))
    rows = np.zeros((2, smollm2.n_vocab), dtype=np.float32)
    with context(smollm2, 64) as ctx:
        ctx.decode(tokens)
        rows[0] = ctx.logits()
    proposals = []
    for draft in (tiny_llama, smollm2_q4_0):
        with context(draft, 64) as ctx:
            ctx.decode(tokens)
            proposals.append(speculative.Distribution(SAMPLE_PARAMS, draft.n_vocab)(ctx.logits()))
    proposals.append(None)  # point mass on the target's second most likely token
    second = int(p[0][np.argsort(-p[1])[1]])
    rng = np.random.default_rng(1234)
    for q in proposals:
        counts: dict[int, int] = {}
        for _ in range(3000):
            if q is None:
                token, qs = second, None
            else:
                token = speculative._draw(rng, *q)
                qs = [q]
            first = speculative.verify(rows.copy(), [token], qs, dist_t, False, rng, smollm2.n_vocab)[0]
            counts[first] = counts.get(first, 0) + 1
        assert _chi_square_p_value(counts, expected) > 1e-3, (counts, expected)


def _first_token_counts(model, prompt, n, **kwargs):
    counts: dict[int, int] = {}
    with context(model, 128) as ctx:
        for seed in range(n):
            params = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=seed)
            steps = llmplace.stream_generate(model, prompt, max_tokens=2, sampling=params, context=ctx,
                                             adaptive_depth=False, **kwargs)
            first = next(steps).token
            steps.close()
            counts[first] = counts.get(first, 0) + 1
    return counts


def test_speculative_sampling_keeps_the_target_distribution_end_to_end(smollm2, tiny_llama):
    """Through stream_generate, seeds 0..N-1, draft = random llama (its proposals are mostly rejected, so the
    residual distribution does most of the work), then prompt lookup on a prompt whose last bigram recurs."""
    with context(tiny_llama, 128) as draft_ctx:  # a Context as the draft: reused, not made per call
        for prompt, kwargs in ((PROMPT, {"draft": draft_ctx, "depth": 1}),
                               ("red green blue red green blue red green", {"lookup": True, "depth": 1})):
            with context(smollm2, 64) as ctx:
                ctx.decode(smollm2.tokenize(prompt))
                ids, probs = speculative.Distribution(SAMPLE_PARAMS, smollm2.n_vocab)(ctx.logits())
            expected = dict(zip(ids.tolist(), probs.tolist()))
            with context(smollm2, 128) as ctx:  # the drafter does propose a token for the first position
                once = llmplace.generate(smollm2, prompt, max_tokens=2, sampling=SAMPLE_PARAMS, context=ctx,
                                         adaptive_depth=False, **kwargs)
                assert once.speculative.drafted == 1
            counts = _first_token_counts(smollm2, prompt, 250, **kwargs)
            assert _chi_square_p_value(counts, expected) > 1e-3, (counts, expected)


def test_seeded_speculative_sampling_is_reproducible_at_fixed_depth(smollm2, smollm2_q4_0):
    """Adaptive depth follows measured timings, so which positions were drafted (and so the draws) can differ
    from run to run; at a fixed depth a seed gives the same tokens."""
    kwargs = {"max_tokens": 20, "temperature": 0.8, "seed": 7, "draft": smollm2_q4_0, "adaptive_depth": False}
    with context(smollm2) as ctx:
        first = llmplace.generate(smollm2, PROMPT, context=ctx, **kwargs)
        assert llmplace.generate(smollm2, PROMPT, context=ctx, **kwargs).tokens == first.tokens
    assert first.speculative.drafted > 0


# ---- refusals ----

def test_incompatible_draft_is_refused_naming_the_first_differing_token(smollm2, gemma3_path):
    with llmplace.load(gemma3_path, progress=False) as gemma:
        with pytest.raises(llmplace.IncompatibleDraftError, match=r"token 5 differs") as info:
            llmplace.stream_generate(smollm2, PROMPT, max_tokens=8, draft=gemma)
        assert isinstance(info.value, ValueError) and isinstance(info.value, llmplace.LlmplaceError)
        assert "tokenizer types differ" in str(info.value)
        with pytest.raises(llmplace.IncompatibleDraftError):  # checked even when nothing is to be generated
            llmplace.stream_generate(smollm2, PROMPT, max_tokens=0, draft=gemma)
        with pytest.raises(llmplace.IncompatibleDraftError):
            llmplace.generate(gemma, PROMPT, max_tokens=8, draft=smollm2)
    # the interpreter survives and the next call works
    assert plain(smollm2, PROMPT, max_tokens=5, lookup=True).tokens == plain(smollm2, PROMPT, max_tokens=5).tokens


def test_bad_speculative_arguments_are_refused_at_the_call(smollm2, tmp_path):
    with pytest.raises(llmplace.InvalidParameterError, match="depth"):
        llmplace.stream_generate(smollm2, PROMPT, lookup=True, depth=0)
    with pytest.raises(llmplace.InvalidParameterError, match="not both"):
        llmplace.stream_generate(smollm2, PROMPT, lookup=True, draft=smollm2)
    with pytest.raises(llmplace.InvalidParameterError, match="penalt"):
        llmplace.stream_generate(smollm2, PROMPT, lookup=True, repeat_penalty=1.1)
    with pytest.raises(llmplace.InvalidParameterError, match="typical_p"):
        llmplace.stream_generate(smollm2, PROMPT, draft=smollm2, typical_p=0.9)
    with pytest.raises(llmplace.InvalidParameterError, match="mirostat"):
        llmplace.stream_generate(smollm2, PROMPT, lookup=True, mirostat=2)
    with pytest.raises(llmplace.InvalidParameterError, match="draft must be"):
        llmplace.stream_generate(smollm2, PROMPT, draft=3)
    with pytest.raises(llmplace.ModelLoadError, match="not found"):
        llmplace.stream_generate(smollm2, PROMPT, draft=tmp_path / "missing.gguf")


# ---- quantize ----

def test_quantize_writes_a_loadable_model_of_the_asked_type(smollm2_q4_0_path, smollm2_q4_0):
    assert smollm2_q4_0_path.exists()
    assert "Q4_0" in smollm2_q4_0.description
    assert not list(smollm2_q4_0_path.parent.glob("*.part"))


def test_quantize_refuses_bad_inputs_with_typed_errors(smollm2_path, tmp_path):
    with pytest.raises(llmplace.ModelLoadError, match="not found"):
        llmplace.quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf")
    with pytest.raises(llmplace.InvalidParameterError, match="unknown quantization type"):
        llmplace.quantize(smollm2_path, tmp_path / "out.gguf", "q4_9")
    with pytest.raises(llmplace.InvalidParameterError, match="does not exist"):
        llmplace.quantize(smollm2_path, tmp_path / "no" / "such" / "out.gguf")
    with pytest.raises(llmplace.InvalidParameterError, match="directory"):
        llmplace.quantize(smollm2_path, tmp_path)
    with pytest.raises(llmplace.InvalidParameterError, match="source"):
        llmplace.quantize(smollm2_path, smollm2_path)
    with pytest.raises(PermissionError):
        llmplace.quantize(smollm2_path, "/sys/out.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all, just bytes" * 4)
    with pytest.raises(llmplace.ModelLoadError, match="not a GGUF"):
        llmplace.quantize(tmp_path / "junk.gguf", tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "out.gguf").exists()
