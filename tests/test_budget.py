"""Budgets mean what the process uses: the runtime row of estimate and fit, its rules for the CPU and RPC devices,
its arithmetic with a fixed cost given by the test; fit shrinking the context for any memory; load(n_ctx=...).

The runtime row of a GPU is measured by a child process on the device (runtime_cost.py); that measurement and
the plans it gives are proven under a real memory cap on the GPU machine (benchmarks/budget_cap.py), not here."""

from __future__ import annotations

import pytest

import llmplace
from llmplace import ContextOverflowError, InvalidParameterError
from llmplace.memory import breakdown
from llmplace.planning import estimate, fit

MiB = 1 << 20


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPLACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_host_and_rpc_devices_have_no_runtime_row_and_nothing_is_measured(rpc_devices, smollm2_path,
                                                                              empty_cache):
    planned = estimate(smollm2_path, n_ctx=512, tensor_split=[1, 1])
    assert {d.name for d in rpc_devices} <= set(planned.memories)
    assert all(m.runtime == 0 and m.total == m.buffers for m in planned.memories.values())
    assert not empty_cache.exists()  # the rule, not a child process, decided: nothing was cached
    assert "runtime" in str(planned).splitlines()[0]


def test_a_given_runtime_is_added_to_the_device_and_counted_in_its_total(rpc_devices, smollm2_path, empty_cache):
    device = rpc_devices[0].name
    plain = estimate(smollm2_path, n_ctx=512, devices=[device])
    given = estimate(smollm2_path, n_ctx=512, devices=[device], runtime={device: "100MiB"})
    assert given[device].runtime == 100 * MiB and given[device].buffers == plain[device].buffers
    assert given[device].total == plain[device].total + 100 * MiB
    assert given["host"] == plain["host"]  # the host has no runtime row
    # a single figure is for the measured devices (GPUs): an RPC device keeps its rule
    assert estimate(smollm2_path, n_ctx=512, devices=[device], runtime="64MiB")[device].runtime == 0


def test_fit_leaves_the_runtime_out_of_the_room_for_buffers(rpc_devices, smollm2_path, empty_cache):
    device = rpc_devices[0].name
    opts = dict(n_ctx=512, margin=0, devices=[device])
    everything = estimate(smollm2_path, n_ctx=512, devices=[device])[device].buffers
    budget = everything + 16 * MiB  # all of it fits, when nothing else is on the device
    assert fit(smollm2_path, budget={device: budget}, runtime=0, **opts).n_gpu_layers in (-1, 31, 32)
    runtime = 64 * MiB
    result = fit(smollm2_path, budget={device: budget}, runtime={device: runtime}, **opts)
    assert result.success, result.message
    use = result.estimate[device]
    assert use.runtime == runtime and use.total <= budget and use.buffers <= budget - runtime
    assert use.buffers < everything  # the runtime took room: fewer layers on the device
    with llmplace.load(smollm2_path, progress=False, devices=[device], **result.load_kwargs()) as model, \
            llmplace.Context(model, n_ctx=512) as ctx:
        assert breakdown(ctx._ptr)[device].buffers == use.buffers  # the plan's buffers, byte for byte


def test_a_runtime_given_for_a_device_the_plan_leaves_empty_is_accepted(rpc_devices, smollm2_path, empty_cache):
    first, second = (d.name for d in rpc_devices)
    planned = estimate(smollm2_path, n_ctx=512, devices=[first], runtime={first: "32MiB", second: "32MiB"})
    assert second not in planned.memories and planned[first].runtime == 32 * MiB


@pytest.mark.parametrize("runtime", [{"NoSuchDevice": "1GiB"}, {"RPC0": "lots"}, "-1GiB", object()])
def test_an_unreadable_runtime_is_refused(rpc_devices, smollm2_path, runtime):
    with pytest.raises(InvalidParameterError):
        estimate(smollm2_path, n_ctx=512, runtime=runtime)


def test_fit_shrinks_the_context_to_meet_a_host_budget(smollm2_path):
    # No GPU and no RPC device: everything is host memory, which llama.cpp's own fit does not bound.
    whole = fit(smollm2_path, n_ctx=0, n_ctx_min=1024, margin=0)
    assert whole.success and whole.n_ctx == 8192  # SmolLM2's trained length
    budget = whole.estimate["host"].total - 40 * MiB
    shrunk = fit(smollm2_path, budget={"host": budget}, n_ctx=0, n_ctx_min=1024, margin=0)
    assert shrunk.success, shrunk.message
    assert 1024 <= shrunk.n_ctx < 8192 and shrunk.n_ctx % 256 == 0
    assert shrunk.estimate["host"].total <= budget
    assert f"context of {shrunk.n_ctx} tokens" in shrunk.message
    fixed = fit(smollm2_path, budget={"host": budget}, n_ctx=8192, margin=0)  # a fixed size is not shrunk
    assert not fixed.success and fixed.n_ctx == 8192
    floor = fit(smollm2_path, budget={"host": 150 * MiB}, n_ctx=0, n_ctx_min=4096, margin=0)
    assert not floor.success and floor.n_ctx >= 4096  # never below n_ctx_min


def test_load_n_ctx_is_the_default_context_size(smollm2_path):
    with llmplace.load(smollm2_path, n_ctx=512, progress=False) as model:
        assert model.default_n_ctx == 512
        with llmplace.Context(model) as ctx:
            assert ctx.n_ctx == 512
        with llmplace.Context(model, n_ctx=1024) as ctx:  # an explicit size still wins
            assert ctx.n_ctx == 1024
        with pytest.raises(ContextOverflowError, match="512"):
            llmplace.generate(model, "word " * 600, max_tokens=4)
        assert llmplace.generate(model, "Hello", max_tokens=2, temperature=0).tokens
    with llmplace.load(smollm2_path, progress=False) as model:  # 0 / default: Context's own default
        assert model.default_n_ctx is None


@pytest.mark.parametrize("n_ctx", [-5, -1, 1 << 40, 2.5, "4096", True, None])
def test_load_refuses_an_n_ctx_that_is_not_a_size(smollm2_path, n_ctx):
    with pytest.raises(InvalidParameterError, match="n_ctx"):
        llmplace.load(smollm2_path, n_ctx=n_ctx, progress=False)


def test_dense_hot_tensors_first_keeps_attention_and_kv_on_the_device(rpc_devices, smollm2_path, empty_cache):
    from llmplace.gguf_info import read as read_gguf
    from llmplace.planning import SWITCH_BYTES

    device = rpc_devices[0].name
    opts = dict(n_ctx=1024, margin=0, devices=[device], runtime=0)
    budget = int(estimate(smollm2_path, n_ctx=1024, devices=[device])[device].total * 0.85)
    layers = fit(smollm2_path, budget={device: budget}, dense="layers", **opts)
    hot = fit(smollm2_path, budget={device: budget}, dense="hot", **opts)
    assert layers.success and hot.success, (layers.message, hot.message)
    assert 0 <= layers.n_gpu_layers < 31 and hot.n_gpu_layers == -1 and "hot tensors first" in hot.message
    assert hot.estimate[device].total <= budget and hot.estimate["host"].kv == 0 < layers.estimate["host"].kv
    with llmplace.load(smollm2_path, progress=False, devices=[device], **hot.load_kwargs()) as model, \
            llmplace.Context(model, n_ctx=1024) as ctx:
        report = model.placement_report()
        on_host = {t.role for t in report if t.layer is not None and t.buffer_type.startswith("CPU")}
        assert on_host == {"ffn"}  # attention and norms of every layer stayed on the device
        assert breakdown(ctx._ptr)[device].buffers == hot.estimate[device].buffers
        assert llmplace.generate(model, "Hi", max_tokens=2, temperature=0, context=ctx).tokens
    # "auto" takes the plan the model says reads less host memory per token (switches counted)
    moved_layers = {a.tensor.layer for a in hot.placement.resolve(read_gguf(smollm2_path).tensors).assignments}

    def cost(plan, switches):
        return plan.estimate["host"].weights + plan.estimate["host"].kv + switches * SWITCH_BYTES

    auto = fit(smollm2_path, budget={device: budget}, **opts)
    expected = hot if cost(hot, 2 * len(moved_layers)) < cost(layers, 2) else layers
    assert auto.n_gpu_layers == expected.n_gpu_layers and auto.to_ot() == expected.to_ot()
    with pytest.raises(InvalidParameterError, match="dense"):
        fit(smollm2_path, dense="attention-first", **opts)


@pytest.mark.parametrize("item", ["CUDA0", "700MiB"])
def test_fit_command_refuses_a_runtime_without_a_device(smollm2_path, item):
    from llmplace.cli import main

    with pytest.raises(SystemExit, match="write DEVICE=SIZE, e.g. --runtime CUDA0=700MiB"):
        main(["fit", str(smollm2_path), "--runtime", item])
