"""Placement on a real GPU (the `gpu` marker): run on the lent GPU machine, skipped where no GPU backend
is installed (CI has none; DESIGN §7 covers multi-device placement there with RPC devices).

    pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import llmplace
from llmplace.placement import Placement, Rule, cpu_moe, distribute, is_host_buffer, n_cpu_moe, read_back
from llmplace.planning import explain

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    gpus = [d for d in llmplace.devices() if d.kind == "gpu"]
    if not gpus:
        pytest.skip("no GPU backend on this machine (install a GPU plugin build)")
    return gpus[0]


PLACEMENTS = {
    "all on the GPU": None,
    "experts on CPU": cpu_moe(),
    "experts of layer 0 on CPU": n_cpu_moe(1),
    "attention on GPU, rest on CPU": Placement([Rule("gpu", role="attention"), Rule("cpu", pattern=r"^blk\.")]),
    "output on CPU": "output=CPU",
}


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_explain_equals_read_back_and_bytes_per_device_on_the_gpu(gpu, tiny_qwen3moe_path, name):
    placement = PLACEMENTS[name]
    plan = explain(tiny_qwen3moe_path, placement)
    with llmplace.load(tiny_qwen3moe_path, placement=placement, progress=False) as model:
        landed = model.placement_report()
        loaded_bytes: dict[str, int] = {}
        for buffer_type, n_bytes in read_back(model).values():
            memory = "host" if is_host_buffer(buffer_type) else buffer_type
            loaded_bytes[memory] = loaded_bytes.get(memory, 0) + n_bytes
    assert [(t.name, t.memory, t.rule) for t in plan.tensors] == [(t.name, t.memory, t.rule) for t in landed]
    assert plan.memory_totals() == loaded_bytes
    assert gpu.buffer_type in loaded_bytes
    if name == "experts on CPU":
        assert {t.memory for t in landed if t.role == "experts"} == {"host"}
        assert {t.buffer_type for t in landed if t.role == "attention"} == {gpu.buffer_type}


def test_pinned_host_memory_placement(gpu, tiny_qwen3moe_path):
    # Without mmap the experts are copied into pinned memory (CUDA_Host); with mmap llama.cpp maps them.
    with llmplace.load(tiny_qwen3moe_path, placement=[Rule("cuda_host", role="experts")], use_mmap=False,
                       progress=False) as model:
        landed = {t.buffer_type for t in model.placement_report() if t.role == "experts"}
        assert landed == {gpu.host_buffer_type}
        assert llmplace.generate(model, "Hello", max_tokens=8, temperature=0).tokens


def test_distribute_on_one_gpu_says_why_it_keeps_layer_split(gpu, tiny_llama_path):
    with llmplace.load(tiny_llama_path, placement=distribute(), progress=False) as model:
        assert model.split.mode == "layer" and "two or more GPUs" in model.split.reason
        assert model.split.devices == (gpu.name,)


AGREEMENT_PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nGive me three tips for staying focused while studying.<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
]


def test_cpu_and_gpu_greedy_choices_agree_on_a_real_model(gpu, smollm2_path):
    """The issue's figure: how often a CPU and a GPU placement make the same greedy choice (first 256 tokens).

    The CPU's greedy text is the reference. The GPU follows the same text one token at a time, as generation
    would, and its greedy choice is compared at every position: a single near-tie would otherwise make every
    later token of a free-running comparison differ, so this counts disagreements, not their consequences.

    Measured on the H100 with SmolLM2-135M Q4_1: 0.907, not the 0.99 hoped for. The GPU's own greedy text is
    llama.cpp's (test below: identical to llama-simple -ngl 99), and llama-simple's CPU and GPU texts part
    after the same few tokens: CUDA's kernels round differently (activations quantized per block, other
    reduction orders), and this small 4-bit model has many near-ties. The bound guards against a real fault
    (a wrong kernel or a broken cache gives far less), not against rounding."""
    n_tokens = 256
    agree = total = 0
    prefixes = []
    with llmplace.load(smollm2_path, n_gpu_layers=0, progress=False) as cpu_model, \
            llmplace.load(smollm2_path, progress=False) as gpu_model:
        assert {t.memory for t in gpu_model.placement_report() if t.name.startswith("blk.")} == {gpu.name}
        for prompt in AGREEMENT_PROMPTS:
            reference = llmplace.generate(cpu_model, prompt, max_tokens=n_tokens, temperature=0).tokens
            free = llmplace.generate(gpu_model, prompt, max_tokens=n_tokens, temperature=0).tokens
            prefixes.append(next((i for i, (a, b) in enumerate(zip(reference, free)) if a != b),
                                 min(len(reference), len(free))))
            with llmplace.Context(gpu_model, n_ctx=512) as ctx:
                ctx.decode(gpu_model.tokenize(prompt))
                for token in reference:
                    agree += int(ctx.logits().argmax()) == token
                    total += 1
                    ctx.decode([token])
    rate = agree / total
    print(f"\nCPU vs GPU greedy agreement, SmolLM2-135M: {agree}/{total} = {rate:.4f}; "
          f"free-running common prefixes {prefixes}")
    assert total >= 3 * 64
    assert rate >= 0.85


@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS[::2])
def test_gpu_greedy_text_equals_llama_simple_on_the_gpu(gpu, smollm2_path, prompt):
    """llmplace on the GPU computes what llama.cpp's own llama-simple computes there, token for token."""
    import models

    with llmplace.load(smollm2_path, progress=False) as model:
        reference = models.llama_simple_reply(model, prompt, 48, n_gpu_layers=99)
        ours = llmplace.generate(model, prompt, max_tokens=48, temperature=0).text
    assert ours.strip() and ours == reference


def test_chat_on_the_gpu_reuses_its_cache(gpu, smollm2_path):
    with llmplace.load(smollm2_path, progress=False) as model:
        chat = llmplace.Chat(model, system_prompt="You are a concise assistant.")
        first = chat.submit("What is the capital of France?", max_tokens=24, temperature=0)
        assert "Paris" in first.text
        second = chat.submit("And of Italy?", max_tokens=24, temperature=0)
        assert second.text.strip() and second.generated_tokens > 0
        # the second turn computed only its own message, not the history again
        assert 0 < second.prompt_evaluated < second.prompt_tokens - first.prompt_tokens


def test_prompt_lookup_on_the_gpu_drafts_and_learns_the_context(gpu, smollm2_path):
    """Speculative decoding with prompt lookup on the GPU: the code the reply repeats is drafted and accepted,
    and the context keeps what the controller learned (batch sizes run in it) for its next call."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from speculative import EDIT_PROMPT   # the benchmark's rename-this-code prompt

    with llmplace.load(smollm2_path, progress=False) as model, llmplace.Context(model, n_ctx=1024) as ctx:
        plain = llmplace.generate(model, EDIT_PROMPT, max_tokens=96, temperature=0, context=ctx)
        fixed = llmplace.generate(model, EDIT_PROMPT, max_tokens=96, temperature=0, context=ctx, lookup=True,
                                  adaptive_depth=False)
        stats = fixed.speculative
        assert plain.tokens and fixed.tokens and stats.accepted >= 10, stats   # H100: 18 of 45
        assert ctx.speculation_memory["runs"][1] >= 3 and len(ctx.speculation_memory["runs"]) >= 2
        adaptive = llmplace.generate(model, EDIT_PROMPT, max_tokens=96, temperature=0, context=ctx, lookup=True)
        assert adaptive.tokens and adaptive.speculative.source == "lookup"


@pytest.mark.parametrize("placement", [None, "exps=CPU"])
def test_estimate_matches_the_allocation_on_the_gpu(gpu, small_qwen3moe_path, placement):
    from llmplace.memory import breakdown
    from llmplace.planning import estimate

    planned = estimate(small_qwen3moe_path, placement, n_ctx=1024)
    with llmplace.load(small_qwen3moe_path, placement=placement, progress=False) as model, \
            llmplace.Context(model, n_ctx=1024) as ctx:
        real = breakdown(ctx._ptr)
    for memory, use in real.items():
        assert memory in planned.memories, memory
        # llama.cpp's buffers; the runtime row (the CUDA context, pools ...) is not a buffer: benchmarks/budget_cap.py
        # measures it against nvidia-smi under a real cap
        print(f"\n{placement}: {memory} estimate {planned[memory].buffers} real {use.buffers}")
        assert abs(planned[memory].buffers - use.buffers) <= 0.01 * use.buffers, memory
