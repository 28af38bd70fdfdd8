"""Placement on a real GPU (the `gpu` marker): run on the lent GPU machine, skipped where no GPU backend
is installed (CI has none; DESIGN §7 covers multi-device placement there with RPC devices).

    pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import pytest

import llmplace
from llmplace.placement import Placement, Rule, cpu_moe, distribute, explain, is_host_buffer, n_cpu_moe, read_back

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
