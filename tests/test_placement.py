"""Placement rules: first match wins, structured selectors, -ot strings, compile, explain == read-back.

Multi-device cases run on two local RPC servers (devices RPC0, RPC1), DESIGN §7."""

from __future__ import annotations

import pytest

import llmplace
from llmplace import DeviceNotFoundError, PlacementError
from llmplace.gguf_info import read
from llmplace.placement import Placement, Rule, cpu_moe, distribute, experts, n_cpu_moe, regex_search
from llmplace.planning import explain


def host_normalized(buffer_type: str) -> str:
    # Host memory shows as CPU (dry run), CPU_Mapped (mmap'd file) or CPU_REPACK (repacked for faster kernels).
    return "CPU" if buffer_type.startswith("CPU") else buffer_type


def test_first_matching_rule_wins(tiny_qwen3moe_path):
    tensors = read(tiny_qwen3moe_path).tensors
    placement = Placement([Rule("cpu", role="experts", layers=0), Rule("gpu:1", pattern="exps"),
                           Rule("gpu", pattern="never-matches")])
    assigned = {a.tensor.name: (a.rule_index, a.target) for a in placement.assign(tensors)}
    assert assigned["blk.0.ffn_up_exps.weight"] == (0, "cpu")
    assert assigned["blk.1.ffn_up_exps.weight"] == (1, "gpu:1")
    assert "blk.0.attn_q.weight" not in assigned
    assert placement.unmatched_rules(tensors) == [2]


def test_structured_selectors(tiny_qwen3moe_path):
    tensors = read(tiny_qwen3moe_path).tensors
    by_name = {t.name: t for t in tensors}
    assert Rule("cpu", role="router").matches(by_name["blk.1.ffn_gate_inp.weight"])
    assert Rule("cpu", role="attention", layers=range(1, 2)).matches(by_name["blk.1.attn_k.weight"])
    assert not Rule("cpu", role="attention", layers=[0]).matches(by_name["blk.1.attn_k.weight"])
    assert Rule("cpu", dtype="f32").matches(by_name["output_norm.weight"])
    big = max(tensors, key=lambda t: t.n_bytes)
    assert Rule("cpu", min_bytes=big.n_bytes).matches(big)
    assert not Rule("cpu", max_bytes=big.n_bytes - 1).matches(big)
    assert Rule("cpu", where=lambda t: len(t.shape) == 3).matches(by_name["blk.0.ffn_down_exps.weight"])


def test_ot_string_and_pairs_parse_like_llama_cpp(tiny_qwen3moe_path):
    tensors = read(tiny_qwen3moe_path).tensors
    from_string = Placement.parse(r"exps=CPU,blk\.0\.attn=RPC0")
    from_pairs = Placement.parse([("exps", "CPU"), (r"blk\.0\.attn", "RPC0")])
    assert [(r.pattern, r.to) for r in from_string.rules] == [(r.pattern, r.to) for r in from_pairs.rules]
    assert [(a.tensor.name, a.target) for a in from_string.assign(tensors)] == \
        [(a.tensor.name, a.target) for a in from_pairs.assign(tensors)]
    with pytest.raises(PlacementError, match="pattern>=<device>|regex>=<device>"):
        Placement.parse("exps-CPU")


def test_regex_semantics_are_llama_cpps_substring_search():
    assert regex_search(r"attn", "blk.0.attn_q.weight")             # found anywhere, no anchors needed
    assert not regex_search(r"^attn", "blk.0.attn_q.weight")
    assert regex_search(r"blk\.[0-9]\.ffn", "blk.7.ffn_up.weight")
    assert not regex_search(r"blk\.[0-9]\.ffn", "blk.17.ffn_up.weight")


def test_compiled_overrides_select_exactly_the_assigned_tensors(tiny_qwen3moe_path):
    tensors = read(tiny_qwen3moe_path).tensors
    placement = Placement([Rule("cpu", role="experts"), Rule("gpu", role="attention", layers=1),
                           Rule("gpu:1", pattern="output")])
    overrides = placement.compile(tensors)
    assert len(overrides) <= 3 * 8
    assigned = {a.tensor.name: a.target for a in placement.assign(tensors)}
    for t in tensors:
        first = next((target for pattern, target in overrides if regex_search(pattern, t.name)), None)
        assert first == assigned.get(t.name), t.name


def test_presets_match_llama_cpp_flags(tiny_qwen3moe_path):
    tensors = read(tiny_qwen3moe_path).tensors
    cpu_all = {a.tensor.name for a in cpu_moe().assign(tensors)}
    assert cpu_all == {t.name for t in tensors if "_exps." in t.name}
    first_layer = {a.tensor.name for a in n_cpu_moe(1).assign(tensors)}
    assert first_layer == {t.name for t in tensors if "_exps." in t.name and t.name.startswith("blk.0.")}
    assert {a.tensor.name for a in experts(layers=[1]).assign(tensors)} == cpu_all - first_layer


@pytest.mark.parametrize("pattern", [r"blk\.(", "[unclosed", "exps)"])
def test_invalid_regex_is_refused_before_llama_cpp_sees_it(pattern, tiny_qwen3moe_path, smollm2):
    with pytest.raises(PlacementError, match="invalid tensor pattern"):
        Rule("cpu", pattern=pattern)
    with pytest.raises(PlacementError, match="invalid tensor pattern"):
        llmplace.load(tiny_qwen3moe_path, placement=f"{pattern}=CPU", progress=False)
    assert smollm2.tokenize("still alive")


def test_bad_rules_and_targets(tiny_qwen3moe_path):
    with pytest.raises(PlacementError, match="roles are"):
        Rule("cpu", role="mlp")
    with pytest.raises(PlacementError, match="layer indices"):
        Rule("cpu", layers=[-1])
    with pytest.raises(DeviceNotFoundError, match="not a device or buffer type"):
        llmplace.load(tiny_qwen3moe_path, placement="exps=CUDA7", progress=False)
    with pytest.raises(DeviceNotFoundError, match="GPU"):
        llmplace.load(tiny_qwen3moe_path, placement=[Rule("gpu:5", role="experts")], progress=False)


def test_unreachable_rpc_server_is_an_error_not_an_abort(smollm2):
    from llmplace.backends import add_rpc_server

    with pytest.raises(DeviceNotFoundError, match="cannot reach the RPC server"):
        add_rpc_server("127.0.0.1:1", timeout=0.5)
    with pytest.raises(DeviceNotFoundError, match="host:port"):
        add_rpc_server("no-port-here")
    assert smollm2.tokenize("still alive")


def test_explain_equals_where_llama_cpp_puts_tensors(rpc_devices, tiny_qwen3moe_path):
    rpc0, rpc1 = (d.name for d in rpc_devices)
    placement = Placement([Rule(rpc1, role="experts"), Rule("cpu", role="attention", layers=0),
                           Rule(rpc0, pattern="output"), Rule(rpc0, pattern="matches-nothing")])
    plan = explain(tiny_qwen3moe_path, placement)
    assert plan.unmatched_rules == [3]
    with llmplace.load(tiny_qwen3moe_path, placement=placement, progress=False) as model:
        landed = model.placement_report()
    assert [t.name for t in plan.tensors] == [t.name for t in landed]
    for planned, actual in zip(plan.tensors, landed):
        assert host_normalized(planned.buffer_type) == host_normalized(actual.buffer_type), planned.name
        assert planned.rule == actual.rule
    experts_on = {t.buffer_type for t in plan.tensors if t.role == "experts"}
    assert experts_on == {rpc_devices[1].buffer_type}
    assert all(host_normalized(t.buffer_type) == "CPU" for t in plan.tensors
               if t.role == "attention" and t.layer == 0)
    totals = plan.totals()
    assert sum(totals.values()) == sum(t.n_bytes for t in plan.tensors)


def test_same_greedy_output_whatever_the_placement(rpc_devices, tiny_qwen3moe_path):
    outputs = []
    for placement, n_gpu_layers in [(None, 0), (Placement([Rule(rpc_devices[1].name, role="experts")]), -1),
                                    (f"attn=CPU,exps={rpc_devices[0].name}", -1)]:
        with llmplace.load(tiny_qwen3moe_path, placement=placement, n_gpu_layers=n_gpu_layers,
                           progress=False) as model:
            outputs.append(llmplace.generate(model, "Hello there", max_tokens=12, temperature=0).tokens)
    assert outputs[0] == outputs[1] == outputs[2]


def layers_per_buffer(model) -> dict[str, int]:
    from llmplace.placement import read_back

    layers: dict[str, set[int]] = {}
    for name, (buffer_type, _) in read_back(model).items():
        if name.startswith("blk."):
            layers.setdefault(buffer_type, set()).add(int(name.split(".")[1]))
    return {k: len(v) for k, v in layers.items()}


# llama.cpp splits n_layer + 1 slots (the output layer is the last) by the cumulative normalized weights:
# slot i goes to the first device whose cumulative share exceeds i / (n_layer + 1). SmolLM2: 30 layers.
@pytest.mark.parametrize("weights,expected", [([2, 1], (21, 9)), ([1, 1], (16, 14)), ([1, 4], (7, 23))])
def test_tensor_split_by_layers_divides_layers_by_normalized_weights(rpc_devices, smollm2_path, weights, expected):
    with llmplace.load(smollm2_path, tensor_split=weights, split_by="layers", progress=False) as model:
        counts = layers_per_buffer(model)
    assert (counts[rpc_devices[0].buffer_type], counts[rpc_devices[1].buffer_type]) == expected


def test_devices_restricts_offload_to_the_named_devices(rpc_devices, smollm2_path):
    with llmplace.load(smollm2_path, devices=[rpc_devices[1].name], progress=False) as model:
        assert layers_per_buffer(model) == {rpc_devices[1].buffer_type: 30}
        assert llmplace.generate(model, "Hi", max_tokens=3, temperature=0).tokens


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(split_mode="row"), PlacementError, "split buffers"),
    (dict(split_mode="diagonal"), PlacementError, "split_mode must be one of"),
    (dict(tensor_split=[1, 1, 1]), PlacementError, "3 entries for 2 offload device"),
    (dict(tensor_split=[-1, 2]), PlacementError, "finite numbers >= 0"),
    (dict(tensor_split=[0, 0]), PlacementError, "positive sum"),
    (dict(tensor_split=[1, 1], split_by="rows"), PlacementError, "split_by must be 'bytes' or 'layers'"),
    (dict(main_gpu=2), PlacementError, "main_gpu=2"),
    (dict(devices=["CPU"]), PlacementError, "leave it out"),
    (dict(devices=["RPC9"]), DeviceNotFoundError, "no device named"),
    (dict(rpc_servers=["127.0.0.1:1"]), DeviceNotFoundError, "cannot reach"),
])
def test_bad_split_configurations_are_refused_before_loading(rpc_devices, smollm2_path, smollm2, kwargs, error,
                                                             fragment):
    with pytest.raises(error, match=fragment):
        llmplace.load(smollm2_path, progress=False, **kwargs)
    assert smollm2.tokenize("still alive")


def device_weight_bytes(model, devices) -> list[int]:
    from llmplace.placement import read_back

    totals: dict[str, int] = {}
    for buffer_type, n_bytes in read_back(model).values():
        totals[buffer_type] = totals.get(buffer_type, 0) + n_bytes
    return [totals.get(d.buffer_type, 0) for d in devices]


@pytest.mark.parametrize("weights", [[1, 1], [2, 1], [1, 4]])
def test_tensor_split_shares_weight_bytes_by_default(rpc_devices, smollm2_path, weights):
    """SmolLM2's output layer (its tied 49152 x 576 embedding) weighs as much as several layers, so llama.cpp's
    layer-count reading gives the last device far more than its share; by bytes, each device's weights come
    within one layer of its share."""
    from llmplace.gguf_info import read

    layer_bytes = max(sum(t.n_bytes for t in read(smollm2_path).tensors if t.layer == i) for i in range(30))
    placed = {}
    for split_by in ("bytes", "layers"):
        with llmplace.load(smollm2_path, tensor_split=weights, split_by=split_by, progress=False) as model:
            placed[split_by] = device_weight_bytes(model, rpc_devices[:2])
            assert llmplace.generate(model, "Hi", max_tokens=3, temperature=0).tokens
    share = weights[0] / sum(weights)
    miss = {k: abs(b[0] - share * sum(b)) for k, b in placed.items()}
    assert miss["bytes"] <= layer_bytes
    assert miss["bytes"] < miss["layers"]


def test_explain_follows_split_keywords(rpc_devices, smollm2_path):
    plan = explain(smollm2_path, None, tensor_split=[1, 4], split_by="layers")
    layers = {}
    for t in plan.tensors:
        if t.layer is not None:
            layers.setdefault(t.buffer_type, set()).add(t.layer)
    assert len(layers[rpc_devices[0].buffer_type]) == 7 and len(layers[rpc_devices[1].buffer_type]) == 23


def test_gpu_host_target_needs_a_gpu(tiny_qwen3moe_path):
    with pytest.raises(DeviceNotFoundError, match="GPU"):
        llmplace.load(tiny_qwen3moe_path, placement=[Rule("cuda_host", role="experts")], progress=False)


def test_a_dry_run_model_cannot_be_run(tiny_qwen3moe_path):
    with llmplace.Model(tiny_qwen3moe_path, dry_run=True, progress=False) as plan_only:
        assert plan_only.n_layer == 2          # metadata is there
        with pytest.raises(llmplace.InvalidParameterError, match="dry run"):
            llmplace.Context(plan_only)


def test_a_rule_that_selects_nothing_warns_or_with_strict_raises(tiny_qwen3moe_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="llmplace"):
        with llmplace.load(tiny_qwen3moe_path, placement="exps=CPU,no_such_tensor=CPU", progress=False):
            pass
    assert any("select no tensor" in r.getMessage() and "no_such_tensor" in r.getMessage() for r in caplog.records)
    with pytest.raises(PlacementError, match="strict=True"):
        llmplace.load(tiny_qwen3moe_path, placement=Placement([Rule("cpu", pattern="no_such_tensor")], strict=True),
                      progress=False)


def test_distribute_without_gpus_keeps_layer_split_and_says_why(tiny_llama_path):
    with llmplace.load(tiny_llama_path, placement=distribute(), progress=False) as model:
        assert model.split.mode == "layer"
        assert "0 offload device" in model.split.reason


def test_distribute_uses_tensor_split_over_every_gpu(rpc_devices, tiny_llama_path):
    plan = explain(tiny_llama_path, distribute())
    assert plan.split.mode == "tensor" and plan.split.devices == tuple(d.name for d in rpc_devices)
    with llmplace.load(tiny_llama_path, placement=distribute(), progress=False) as model:
        assert model.split.mode == "tensor"
        split_output = llmplace.generate(model, "Hello there", max_tokens=12, temperature=0).tokens
    with llmplace.load(tiny_llama_path, n_gpu_layers=0, progress=False) as model:
        assert llmplace.generate(model, "Hello there", max_tokens=12, temperature=0).tokens == split_output


@pytest.mark.parametrize("placement,fragment", [
    (distribute(), "quantization block"),           # tiny qwen3moe: expert rows of 32 = one Q8_0 block
    (cpu_moe() + distribute(), "tensor overrides"),
])
def test_distribute_falls_back_to_layer_split_with_the_reason(rpc_devices, tiny_qwen3moe_path, placement, fragment):
    with llmplace.load(tiny_qwen3moe_path, placement=placement, progress=False) as model:
        assert model.split.mode == "layer" and fragment in model.split.reason
        assert llmplace.generate(model, "Hi", max_tokens=3, temperature=0).tokens


@pytest.mark.parametrize("path_fixture,placement,fragment", [
    ("tiny_qwen3moe_path", None, "quantization block"),   # llama.cpp would abort: tensor write out of bounds
    ("tiny_llama_path", "ffn_up=CPU", "tensor overrides"),  # llama.cpp would abort at the first decode
])
def test_tensor_split_that_llama_cpp_would_abort_on_is_refused(request, rpc_devices, smollm2, path_fixture,
                                                               placement, fragment):
    with pytest.raises(PlacementError, match=fragment):
        llmplace.load(request.getfixturevalue(path_fixture), split_mode="tensor", placement=placement, progress=False)
    assert smollm2.tokenize("still alive")


def test_tensor_split_context_needs_flash_attention_and_an_unquantized_cache(rpc_devices, tiny_llama_path):
    with llmplace.load(tiny_llama_path, split_mode="tensor", progress=False) as model:
        with pytest.raises(llmplace.InvalidParameterError, match="flash attention"):
            llmplace.Context(model, flash_attn=False)
        with pytest.raises(llmplace.InvalidParameterError, match="quantized KV"):
            llmplace.Context(model, type_k="q8_0", type_v="q8_0")
        with llmplace.Context(model, n_ctx=256) as ctx:
            ctx.decode(model.tokenize("works"))


def test_rule_selectors_of_the_wrong_type_are_refused_when_the_rule_is_made():
    # they failed later, inside explain or the load, with an AttributeError or TypeError
    from llmplace.placement import MAX_LAYERS

    for selectors in (dict(dtype=5), dict(min_bytes="1GiB"), dict(min_bytes=-1), dict(min_bytes=5, max_bytes=1),
                      dict(where=5), dict(layers=True), dict(layers=[True])):
        with pytest.raises(llmplace.PlacementError):
            llmplace.Rule("cpu", **selectors)
    # range(10**12) as a set of layer indices took all memory: only layers that can exist are kept
    assert llmplace.Rule("cpu", layers=range(10**12)).layers == frozenset(range(MAX_LAYERS))
