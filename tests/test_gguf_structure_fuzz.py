"""Structure-aware fuzz of model files (issue 17, class 1): well-formed GGUFs with one field's meaning changed.

Mutations of the tiny llama and qwen3moe models (tests/gguf_mutations.py: every tensor retyped to every ggml type,
reshaped, dropped, duplicated; every key/value given another type, length or value, per-layer arrays included;
the architecture and the tokenizer model swapped; NUL, empty and repeated tokens, BYTE-typed tokens, broken
merges) are each loaded, tokenized, decoded for one token and detokenized in worker processes. None may crash or
hang the process or raise an untyped exception: a file llama.cpp cannot run must be refused with an LlmplaceError.

CI runs a deterministic sample (every kind of mutation represented); LLMPLACE_STRUCTURE_FUZZ_CASES=1500 runs more,
as does `python tests/gguf_mutations.py --count 1500` (all ~3,900 mutations with a count above that).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

import gguf_mutations as gm
from llmplace import ModelLoadError
from llmplace.gguf_validate import validate

N_CASES = int(os.environ.get("LLMPLACE_STRUCTURE_FUZZ_CASES", "240"))
SEED = 17


@pytest.fixture(scope="module")
def templates(tiny_llama_path, tiny_qwen3moe_path) -> dict[str, gm.Template]:
    return {"llama": gm.read_template(tiny_llama_path, "llama"),
            "qwen3moe": gm.read_template(tiny_qwen3moe_path, "qwen3moe")}


def test_structure_mutations_never_crash_and_are_refused_with_typed_errors(templates):
    cases = gm.cases_for(templates, N_CASES, SEED)
    start = time.perf_counter()
    results = gm.run(templates, cases, workers=2)
    elapsed = time.perf_counter() - start
    tally = gm.counts(results)
    print(f"\n{len(results)} structure mutations in {elapsed:.0f} s: {tally}")
    bad = [r for r in results if r.kind not in ("typed", "ok")]
    assert not bad, "\n".join(str(r) for r in bad)
    assert len(results) == N_CASES
    clean = [r for r in results if r.what == "unchanged"]
    assert clean and all(r.kind == "ok" for r in clean), clean
    # both answers occur: files llama.cpp runs are still accepted, the others refused by type
    assert tally.get("ok", 0) > N_CASES // 10 and tally.get("typed", 0) > N_CASES // 3, tally
    kinds = {m.kind for _, _, m in cases}
    assert kinds >= {"retype", "reshape", "drop", "duplicate", "extra", "kv", "arch", "tokenizer", "token"}


def _written(templates, tmp_path, model: str, what: str):
    """The mutation of `model` described exactly as `what`, written to a file."""
    mutation = next(m for m in gm.all_mutations(templates[model]) if m.what == what)
    path = tmp_path / f"{model}-{abs(hash(what))}.gguf"
    gm.write(templates[model], mutation, path)
    return path


# The examples of the issue: each used to load and then abort or crash the process. The validator refuses them
# before llama.cpp sees the file (validate() runs no native code, so they are safe to check in this process).
@pytest.mark.parametrize("model,what,fragment", [
    ("llama", "output_norm.weight F32 -> Q4_0", r"1-D weight \(a norm, bias or scale\) must be F32"),
    ("llama", "blk.1.ffn_norm.weight F32 -> I32", "must be F32"),
    ("qwen3moe", "blk.0.attn_q_norm.weight F32 -> F16", "must be F32"),
    ("qwen3moe", "blk.1.attn_k_norm.weight F32 -> BF16", "must be F32"),
    ("llama", "blk.0.attn_output.weight Q8_0 -> Q8_1", "no matrix-multiplication kernel"),
    ("llama", "blk.0.attn_k.weight Q8_0 -> F64", "no matrix-multiplication kernel"),
    ("qwen3moe", "blk.0.ffn_up_exps.weight Q8_0 -> Q8_1", "no matrix-multiplication kernel"),
    ("llama", "tokenizer.ggml.model: str b'gpt2' -> str b'llama'", "no token for"),
    ("llama", "tokenizer.ggml.model: str b'gpt2' -> str b'none'", "has no vocabulary"),
    ("qwen3moe", "tokenizer.ggml.model: str b'gpt2' -> str b'no_vocab'", "has no vocabulary"),
])
def test_files_llama_cpp_aborts_on_are_refused(templates, tmp_path, model, what, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        validate(_written(templates, tmp_path, model, what))


def test_a_token_that_repeats_another_up_to_a_nul_byte_is_refused(templates, tmp_path):
    tokens = templates["llama"].kv("tokenizer.ggml.tokens").value
    path = _written(templates, tmp_path, "llama", "token 10 is token 17 + NUL + x")
    with pytest.raises(ModelLoadError, match=r"twice \(ids 10 and 17; token 10 holds a NUL byte"):
        validate(path)
    assert tokens[17] + b"\x00x" != tokens[17]  # the file's bytes differ: only llama.cpp's reading repeats it


def test_a_byte_typed_token_must_read_as_a_byte(templates, tmp_path):
    path = _written(templates, tmp_path, "llama", "token 200 typed 6")
    with pytest.raises(ModelLoadError, match="typed BYTE, but a byte token's text must be <0xXX>"):
        validate(path)


def _with_expert_used(templates, tmp_path, values: list[int], type_id: int = gm.U32):
    template = templates["qwen3moe"]
    key = "qwen3moe.expert_used_count"
    mutation = gm.Mutation("kv", "test", gm.partial(gm._set_kv, key, gm.KV(key, gm.ARR, values, type_id)))
    path = tmp_path / f"used-{'-'.join(map(str, values))}-{type_id}.gguf"
    gm.write(template, mutation, path)
    return path


def test_per_layer_expert_counts_are_checked_element_by_element(templates, tmp_path):
    assert validate(_with_expert_used(templates, tmp_path, [2, 1])).n_tensors  # a valid per-layer array
    with pytest.raises(ModelLoadError, match="layer 0 uses 0 experts"):
        validate(_with_expert_used(templates, tmp_path, [0, 0]))
    with pytest.raises(ModelLoadError, match="routes layer 1 to 0 experts"):
        validate(_with_expert_used(templates, tmp_path, [2, 0]))
    with pytest.raises(ModelLoadError, match="layer 1 uses 4294967295 experts"):
        validate(_with_expert_used(templates, tmp_path, [2, -1], gm.I32))  # llama.cpp reads int32 as uint32
    with pytest.raises(ModelLoadError, match="layer 0 uses 5 experts"):
        validate(_with_expert_used(templates, tmp_path, [5, 2]))


def test_weights_of_types_the_kernels_take_still_load(templates, tmp_path):
    # retyping a matrix to another type with a CPU kernel is a valid file: the validator must not refuse it
    for what in ("blk.0.attn_q.weight Q8_0 -> Q4_0", "blk.1.ffn_down.weight Q8_0 -> F16",
                 "blk.0.attn_v.weight Q8_0 -> BF16", "output.weight Q8_0 -> Q4_1"):
        assert validate(_written(templates, tmp_path, "llama", what)).n_tensors == len(templates["llama"].tensors)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _with_kv(templates, tmp_path, model: str, key: str, kv):
    mutation = gm.Mutation("kv", "test", gm.partial(gm._set_kv, key, kv))
    path = tmp_path / f"{model}-{abs(hash(repr(kv)))}.gguf"
    gm.write(templates[model], mutation, path)
    return path


@pytest.mark.parametrize("model", ["llama", "qwen3moe"])
def test_a_layer_with_attention_weights_needs_heads(templates, tmp_path, model):
    key = f"{model}.attention.head_count_kv"
    assert validate(_with_kv(templates, tmp_path, model, key, gm.KV(key, gm.ARR, [2, 2], gm.U32))).n_tensors
    with pytest.raises(ModelLoadError, match=f"'{key}' gives layer 1 0 heads, but the layer has attention weights"):
        validate(_with_kv(templates, tmp_path, model, key, gm.KV(key, gm.ARR, [2, 0], gm.U32)))


@pytest.mark.parametrize("n_rot", [0, 8, 17, 2**32 - 1])
def test_rope_must_turn_whole_heads_where_the_graph_asserts_it(templates, tmp_path, n_rot):
    key = "qwen3moe.rope.dimension_count"
    with pytest.raises(ModelLoadError, match=f"is {n_rot}, but a qwen3moe model's RoPE turns whole heads of 16"):
        validate(_with_kv(templates, tmp_path, "qwen3moe", key, gm.KV(key, gm.U32, n_rot)))


def test_a_block_count_of_the_wrong_type_is_left_to_llama_cpp_without_a_python_error(templates, tmp_path):
    # the per-layer checks need an integer layer count; a float one is refused by llama.cpp's own type check
    key = "llama.block_count"
    assert validate(_with_kv(templates, tmp_path, "llama", key, gm.KV(key, gm.F32, 2.0))).n_tensors
