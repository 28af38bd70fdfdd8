"""Malformed GGUF files: 1,000 deterministic mutations of a tiny model's header and tables, zero crashes.

Every mutation runs in this process (the point: the interpreter must survive). Each is first checked by
llmplace.gguf_validate; only those it accepts go on to a real llama.cpp load (vocab only, then a full load
and one generated token), so the file runs in seconds and every accepted file meets the real loader.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import llmplace
from llmplace import LlmplaceError, ModelLoadError
from llmplace.gguf_validate import GGML_TYPES, validate

N_MUTATIONS = 1000


# ---- a tiny model: a 262-token vocabulary and one layer, ~60 KB ----

def _write_tokenizer(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "\u2581a", "a"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]   # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    from llmplace import synthetic

    folder = tmp_path_factory.mktemp("fuzz")
    _write_tokenizer(folder / "vocab.gguf")
    shape = synthetic.LlamaShape(n_layer=1, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, n_ctx_train=128)
    return synthetic.write_model(folder / "tiny.gguf", shape, tokenizer_from=folder / "vocab.gguf", dtype="q8_0",
                                 seed=3)


# ---- where each field of the clean file lies (a walk of the trusted original) ----

@dataclass
class Field:
    kind: str        # "n_tensors", "n_kv", "key_len", "kv_type", "value", "str_len", "arr_type", "arr_len",
    offset: int      # "name_len", "n_dims", "dim", "ggml_type", "data_offset"
    size: int
    tensor: int = -1


def _walk(data: bytes) -> tuple[list[Field], int, list[int]]:
    """The fields of the clean file, the end of the tensor table, and each tensor's data-offset field."""
    fields = [Field("n_tensors", 8, 8), Field("n_kv", 16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 24

    def string(kind):
        nonlocal pos
        fields.append(Field(kind, pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    for _ in range(n_kv):
        string("key_len")
        fields.append(Field("kv_type", pos, 4))
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if t == 8:
            string("str_len")
        elif t == 9:
            fields.append(Field("arr_type", pos, 4))
            fields.append(Field("arr_len", pos + 4, 8))
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if et == 8:
                for i in range(n):
                    if i < 4:
                        fields.append(Field("str_len", pos, 8))
                    (m,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + m
            else:
                pos += n * sizes[et]
        else:
            fields.append(Field("value", pos, sizes[t]))
            pos += sizes[t]
    offsets = []
    for i in range(n_tensors):
        string("name_len")
        fields[-1].tensor = i
        (nd,) = struct.unpack_from("<I", data, pos)
        fields.append(Field("n_dims", pos, 4, i))
        pos += 4
        for _ in range(nd):
            fields.append(Field("dim", pos, 8, i))
            pos += 8
        fields.append(Field("ggml_type", pos, 4, i))
        pos += 4
        fields.append(Field("data_offset", pos, 8, i))
        offsets.append(pos)
        pos += 8
    return fields, pos, offsets


# ---- the mutations ----

_HUGE = [2**63 - 1, 2**64 - 1, 2**32, 2**32 - 1, 2**31, 10**12, 0xFFFFFFFF00000000]


def _put(data: bytearray, field: Field, value: int) -> None:
    value &= (1 << (8 * field.size)) - 1
    data[field.offset:field.offset + field.size] = value.to_bytes(field.size, "little")


def _get(data: bytes, field: Field) -> int:
    return int.from_bytes(data[field.offset:field.offset + field.size], "little")


def mutate(clean: bytes, seed: int) -> tuple[bytes, str]:
    """One deterministic mutation of `clean` (what it did, for the failure message)."""
    rng = random.Random(seed)
    fields, table_end, offsets = _walk(clean)
    data = bytearray(clean)
    kind = ["bitflip", "bitflip", "truncate", "count", "length", "type", "shape", "offset", "value",
            "bytes"][seed % 10]
    if kind == "bitflip":          # 1-8 random bits anywhere in the header, key/values or tensor table
        flips = [(rng.randrange(table_end), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
        for at, bit in flips:
            data[at] ^= 1 << bit
        return bytes(data), f"bit flips {flips}"
    if kind == "truncate":         # mostly inside the tables, sometimes in the tensor data
        at = rng.randrange(table_end) if rng.random() < 0.8 else rng.randrange(table_end, len(clean))
        return bytes(data[:at]), f"truncated at {at}"
    if kind == "bytes":            # a run of random bytes over the tables
        at, n = rng.randrange(table_end), rng.randint(1, 64)
        data[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(data[:len(clean)]), f"{n} random bytes at {at}"
    pools = {"count": ("n_tensors", "n_kv", "arr_len"), "length": ("key_len", "str_len", "name_len", "arr_len"),
             "type": ("kv_type", "arr_type", "ggml_type"), "shape": ("n_dims", "dim"), "offset": ("data_offset",),
             "value": ("value",)}[kind]
    field = rng.choice([f for f in fields if f.kind in pools])
    old = _get(data, field)
    if kind in ("count", "length"):
        value = rng.choice(_HUGE + [old + 1, old - 1, old + rng.randint(2, 1000), 0, old * 2])
    elif kind == "type":
        value = rng.choice([rng.randrange(64), 9, 8, 4, 5, 13, 2**31, 0xFFFFFFFF,
                            4 if field.kind == "ggml_type" else 0])
    elif kind == "shape":
        value = (rng.choice([0, 5, 3, 4, 2**31, 0xFFFFFFFF]) if field.kind == "n_dims" else
                 rng.choice([0, -1, 1, 2**62, 2**63 - 1, 2**40, old + 1, old * 2, old // 2, 2**32]))
    elif kind == "offset":
        others = [_get(data, Field("data_offset", o, 8)) for o in offsets]
        value = rng.choice([old + 1, old + 16, old + 32, old - 32, 2**63, 2**64 - 32, len(clean) * 2,
                            rng.choice(others), 0, old + rng.choice([1, 2, 4, 8]) * 32])
    else:                          # a scalar value (hyperparameters, token ids): 0, huge, negative, random bits
        value = rng.choice([0, 1, 2**(8 * field.size) - 1, 2**(8 * field.size - 1), old + 1, old - 1,
                            rng.getrandbits(8 * field.size)])
    _put(data, field, value)
    return bytes(data), f"{field.kind} at {field.offset} (tensor {field.tensor}): {old} -> {value}"


# ---- the test ----

def _try_mutation(path: Path, data: bytes) -> str:
    """Write, validate, and (when accepted) really load one mutation; return its outcome."""
    path.write_bytes(data)
    try:
        validate(path)
    except ModelLoadError as exc:
        assert "re-download or re-convert" in str(exc) and "at byte" in str(exc), exc
        return "rejected"
    try:
        llmplace.load(path, vocab_only=True, progress=False).close()
    except ModelLoadError:
        return "refused by llama.cpp (vocab)"
    try:
        model = llmplace.load(path, progress=False)
    except ModelLoadError:
        return "refused by llama.cpp"
    with model:
        try:
            llmplace.generate(model, "a a", max_tokens=1, temperature=0)
        except LlmplaceError:
            return "loaded, generation refused"
    return "loaded and generated"


def test_the_clean_model_validates_and_generates(tiny_path, tmp_path):
    assert _try_mutation(tmp_path / "clean.gguf", tiny_path.read_bytes()) == "loaded and generated"


def test_1000_mutations_raise_model_load_error_or_load(tiny_path, tmp_path):
    clean = tiny_path.read_bytes()
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for seed in range(N_MUTATIONS):
        data, what = mutate(clean, seed)
        # a new name per mutation: validation results are cached by path, size and modification time
        path = tmp_path / f"m{seed}.gguf"
        try:
            outcome = _try_mutation(path, data)
        except Exception as exc:  # reported with the mutation that caused it
            raise AssertionError(f"mutation {seed} ({what}) raised {type(exc).__name__}: {exc}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink()
    elapsed = time.perf_counter() - start
    print(f"\n{N_MUTATIONS} mutations in {elapsed:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == N_MUTATIONS
    assert outcomes.get("rejected", 0) > N_MUTATIONS // 2   # most damage is caught before llama.cpp


def test_ggml_type_table_matches_the_compiled_ggml():
    from llmplace._ffi import C, ffi

    known = {t: (ffi.string(C.ggml_type_name(t)).decode().upper(), C.ggml_blck_size(t), C.ggml_type_size(t))
             for t in range(C.GGML_TYPE_COUNT) if C.ggml_blck_size(t)}
    assert known == GGML_TYPES


@pytest.mark.parametrize("alignment,type_id,fragment", [
    (64, 4, None),                                   # valid: data padded to 64 bytes
    (48, 4, "not a power of two"),
    (0, 4, "not a power of two"),
    (64, 5, "must be uint32, not int32"),
])
def test_general_alignment_must_be_a_uint32_power_of_two(tmp_path, alignment, type_id, fragment):
    import gguf
    import numpy as np

    path = tmp_path / "aligned.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("t", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    at = data.index(b"general.alignment") + len(b"general.alignment")
    data[at:at + 8] = struct.pack("<II", type_id, alignment)
    path.write_bytes(data)
    if fragment is None:
        assert validate(path).alignment == 64
    else:
        with pytest.raises(ModelLoadError, match=fragment):
            validate(path)


@pytest.mark.parametrize("key,value,fragment", [
    ("qwen3moe.expert_used_count", 0, "expert_used_count' is 0"),
    ("qwen3moe.expert_used_count", 9, "expert_used_count' is 9"),
    ("qwen3moe.expert_count", 5000, "at most 1024 experts"),
])
def test_expert_counts_llama_cpp_would_abort_on_are_refused(tmp_path, tiny_qwen3moe_path, key, value, fragment):
    # Each fails a GGML_ASSERT in llama.cpp's load_hparams, which aborts the process.
    import shutil

    from gguf import GGUFReader

    path = tmp_path / "moe.gguf"
    shutil.copy(tiny_qwen3moe_path, path)
    reader = GGUFReader(path, "r+")
    reader.fields[key].parts[-1][0] = value
    reader.data.flush()
    del reader
    with pytest.raises(ModelLoadError, match=fragment):
        llmplace.load(path, progress=False)
