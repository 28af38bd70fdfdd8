"""Memory estimate and fit, on two local RPC servers standing in for GPUs (DESIGN §7).

Budgets are given per device below its (host-sized) free memory: the fit plans for them as for a small card."""

from __future__ import annotations

import pytest

import llmplace
from llmplace import DeviceNotFoundError, InvalidParameterError, OutOfMemoryError
from llmplace.memory import breakdown, parse_size
from llmplace.planning import estimate, fit
from llmplace.placement import is_host_buffer

MiB = 1 << 20


@pytest.mark.parametrize("text,expected", [("12GiB", 12 << 30), ("512 MiB", 512 * MiB), ("1.5GB", 1_500_000_000),
                                           ("100", 100), (4096, 4096), ("2kib", 2048)])
def test_sizes_are_read_with_their_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12 GiBs", "-1GiB", "GiB", "", "1e9", -5, float("nan"), True, None])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(InvalidParameterError):
        parse_size(text)


def test_mmapped_weights_are_reported_as_mapped_not_counted_twice(smollm2_path):
    # No RPC device yet (those tests run last): every weight is in host memory.
    mapped, copied = (estimate(smollm2_path, n_ctx=512, use_mmap=mm)["host"] for mm in (True, False))
    assert mapped.mapped == mapped.weights > 0 and copied.mapped == 0
    assert mapped.total == copied.total and mapped.weights == copied.weights
    for use_mmap, planned in ((True, mapped), (False, copied)):
        with llmplace.load(smollm2_path, use_mmap=use_mmap, progress=False) as model, \
                llmplace.Context(model, n_ctx=512) as ctx:
            real = breakdown(ctx._ptr)["host"]
        assert real == planned, use_mmap
    assert "(mmap)" in str(estimate(smollm2_path, n_ctx=512))


# Placements on two RPC "GPUs": everything offloaded (the output layer on the second device), and 20 of 31
# layers offloaded (the rest, mmap'd, in host memory: llama.cpp's mapped buffer spans the file range of the
# offloaded tensors too, which the breakdown must not count as host memory).
@pytest.mark.parametrize("load_kwargs", [{"tensor_split": [2, 1]}, {"tensor_split": [2, 1], "n_gpu_layers": 20}],
                         ids=["all-offloaded", "20-layers"])
def test_estimate_matches_the_real_allocation(rpc_devices, smollm2_path, load_kwargs):
    planned = estimate(smollm2_path, n_ctx=1024, **load_kwargs)
    with llmplace.load(smollm2_path, progress=False, **load_kwargs) as model, \
            llmplace.Context(model, n_ctx=1024) as ctx:
        real = breakdown(ctx._ptr)
    assert set(planned.memories) == set(real) == {"host", rpc_devices[0].name, rpc_devices[1].name}
    for name, used in real.items():
        # Byte for byte, compute buffers included. That needs llmplace's build-time correction of
        # ggml_backend_sched_reserve_size (tools/vendor_llama_cpp.py, keep_layer_pins_when_sizing_a_dry_run):
        # without it the second device's compute buffer came out 4.5 MiB (about 3% of the device) too large.
        assert planned[name] == used, name


def _loaded_bytes(model, ctx) -> dict[str, int]:
    return {name: use.total for name, use in breakdown(ctx._ptr).items()}


def test_fit_under_a_budget_moves_layers_off_and_the_load_respects_it(rpc_devices, smollm2_path):
    budget = {rpc_devices[0].name: "60MiB", rpc_devices[1].name: "60MiB"}
    result = fit(smollm2_path, budget=budget, margin=0, n_ctx=1024, n_ubatch=64)
    assert result.success, result.message
    assert result.n_gpu_layers < 31 and "layers offloaded" in result.message
    with llmplace.load(smollm2_path, fit=True, budget=budget, margin=0, n_ctx=1024, progress=False) as model:
        assert model.fit_result.n_ctx == 1024
        with llmplace.Context(model, n_ubatch=64) as ctx:
            assert ctx.n_ctx == 1024
            used = _loaded_bytes(model, ctx)
            assert llmplace.generate(model, "Hi", max_tokens=3, temperature=0, context=ctx).tokens
    for device in rpc_devices:
        assert used.get(device.name, 0) <= 60 * MiB


def test_context_shrinks_only_when_allowed(rpc_devices, smollm2_path):
    budget = {"gpu0": "40MiB", "gpu1": "40MiB", "host": "10GiB"}
    auto = fit(smollm2_path, budget=budget, margin=0, n_ctx=0, n_ctx_min=512, n_ubatch=64)
    assert auto.success and 512 <= auto.n_ctx <= 8192
    fixed = fit(smollm2_path, budget=budget, margin=0, n_ctx=2048, n_ubatch=64)
    assert fixed.n_ctx == 2048


def test_an_impossible_budget_says_why_and_load_raises(rpc_devices, smollm2_path, smollm2):
    budget = {"gpu0": "1MiB", "gpu1": "1MiB", "host": "50MiB"}
    result = fit(smollm2_path, budget=budget, margin=0, n_ctx=1024)
    assert not result.success and "host memory" in result.message
    with pytest.raises(OutOfMemoryError, match="does not fit"):
        llmplace.load(smollm2_path, fit=True, budget=budget, margin=0, n_ctx=1024, progress=False)
    assert smollm2.tokenize("still alive")


def test_user_rules_are_kept_first_and_fitted_around(rpc_devices, smollm2_path):
    rule = r"blk\.0\.=CPU"
    result = fit(smollm2_path, budget={"gpu0": "60MiB", "gpu1": "60MiB"}, margin=0, n_ctx=1024, n_ubatch=64,
                 placement=rule)
    assert result.success and result.placement.rules[0].pattern == r"blk\.0\."
    with llmplace.load(smollm2_path, progress=False, **result.load_kwargs()) as model:
        layer0 = [t for t in model.placement_report() if t.layer == 0]
    assert layer0 and all(is_host_buffer(t.buffer_type) and t.rule == 0 for t in layer0)


def test_a_draft_model_is_fitted_alongside(rpc_devices, smollm2_path, tiny_llama_path):
    alone = estimate(smollm2_path, n_ctx=1024)
    both = fit(smollm2_path, draft=tiny_llama_path, margin=0, n_ctx=1024)
    assert both.success
    total = lambda e: sum(m.total for m in e.memories.values())  # noqa: E731
    draft = estimate(tiny_llama_path, n_ctx=1024)
    assert total(both.estimate) >= total(alone) + sum(m.weights for m in draft.memories.values())


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(budget={"CUDA7": "1GiB"}), DeviceNotFoundError, "not an offload device"),
    (dict(budget={"gpu0": "12 GiBs"}), InvalidParameterError, "cannot read"),
    (dict(budget={"gpu0": -3}), InvalidParameterError, ">= 0"),
    (dict(budget="12GiB"), InvalidParameterError, "mapping"),
    (dict(n_ctx_min=10**6), InvalidParameterError, "trained"),
    (dict(n_ctx=-1), InvalidParameterError, "n_ctx"),
    (dict(margin="lots"), InvalidParameterError, "cannot read"),
])
def test_bad_fit_inputs_are_refused(rpc_devices, smollm2_path, smollm2, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        fit(smollm2_path, **kwargs)
    assert smollm2.tokenize("still alive")


def test_budget_without_fit_is_refused(smollm2_path):
    with pytest.raises(InvalidParameterError, match="fit=True"):
        llmplace.load(smollm2_path, budget={"gpu0": "1GiB"}, progress=False)


def test_fit_result_prints_as_code_and_as_ot_string(rpc_devices, smollm2_path):
    result = fit(smollm2_path, budget={"gpu0": "60MiB", "gpu1": "60MiB"}, margin=0, n_ctx=1024, n_ubatch=64,
                 placement=r"blk\.0\.=CPU")
    assert result.to_ot().startswith(r"blk\.0\.=CPU")
    code = result.to_python()
    assert "Placement([" in code and f"n_gpu_layers={result.n_gpu_layers}" in code
    assert "weights" in str(result) and "KV cache" in str(result)


def test_fit_command_draws_bars_and_prints_the_plan(smollm2_path, capsys):
    import json

    from llmplace.cli import main

    assert main(["fit", str(smollm2_path), "--budget", "host=2GiB", "--ctx", "1024", "--margin", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits:") and "[MM" in out and "llmplace.load(path, n_gpu_layers=" in out  # M: mapped
    assert main(["fit", str(smollm2_path), "--budget", "host=50MiB", "--ctx", "1024", "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["success"] is False and data["memories"]["host"]["total"] > 50 * MiB


def test_fit_moves_experts_off_a_device_to_meet_its_budget(rpc_devices, small_qwen3moe_path):
    device = rpc_devices[0].name
    opts = dict(n_ctx=512, n_ubatch=16, devices=[device])
    everything = estimate(small_qwen3moe_path, n_ctx=512, n_ubatch=16, devices=[device])[device].total
    budget = everything - 12 * MiB
    result = fit(small_qwen3moe_path, budget={device: budget}, margin=0, **opts)
    assert result.success, result.message
    assert result.estimate[device].total <= budget < everything
    with llmplace.load(small_qwen3moe_path, progress=False, devices=[device], **result.load_kwargs()) as model:
        moved = [t for t in model.placement_report() if t.rule is not None]
        with llmplace.Context(model, n_ctx=512, n_ubatch=16) as ctx:
            used = breakdown(ctx._ptr)[device].total
            assert llmplace.generate(model, "Hi", max_tokens=3, temperature=0, context=ctx).tokens
    # llama.cpp's fit moves whole expert tensors, and for the boundary layer a pattern (ffn_(gate|...).*) that
    # also takes that layer's router: the moved bytes are experts, all of it now in host memory.
    assert moved and all(t.role in ("experts", "router") and is_host_buffer(t.buffer_type) for t in moved)
    # taken from the front, as llama.cpp's --n-cpu-moe does (decodes faster than llama.cpp's fit's last layers)
    layers = sorted({t.layer for t in moved})
    assert layers == list(range(len(layers))), layers
    assert sum(t.n_bytes for t in moved if t.role == "experts") > 0.99 * sum(t.n_bytes for t in moved)
    assert used <= budget
