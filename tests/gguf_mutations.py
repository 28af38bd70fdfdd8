"""Structure-aware mutations of GGUF models, and a batch runner that loads each one in a subprocess.

Byte flips (tests/test_gguf_fuzz.py) mostly break the file's framing, which the validator catches early. The
mutations here keep the file well-formed and change one field's meaning at a time, as a careless converter or a
hostile file would: a tensor retyped to another ggml type (its data resized to match), a tensor reshaped,
dropped or duplicated, a key/value given another type, length or value (zeros, negatives, huge numbers, NaN, a
per-layer array), the architecture or the tokenizer model swapped, a token holding a NUL byte or repeating
another. Files are written with the `gguf` package; the two things it refuses to write (a tensor name twice, a
ggml type it does not know) are patched into the written bytes afterwards.

Each mutation is loaded, tokenized, decoded for one token and detokenized in a worker process; a worker reports
every case before it starts it, so a crash or a hang is pinned on the exact case that caused it (which is then
rerun alone through tests/isolation.py, to make sure it was not an earlier case's doing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

# ggml type ids and (elements per block, bytes per block) at the pinned commit, plus ids that do not exist.
from llmplace.gguf_validate import GGML_TYPES

UNKNOWN_TYPE_IDS = (4, 31, 99)

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_INTS = (U8, I8, U16, I16, U32, I32, U64, I64)

# Text that reaches every tokenizer path: spaces, newlines, punctuation, accents, CJK, an emoji, a NUL byte and
# a control character (bytes no vocabulary has a token of their own for).
PROMPT = "Hello, world!\n\tCaf\u00e9 \u65e5\u672c \U0001F642 a\x00b\x07 <|im_start|> 1234"


@dataclass(frozen=True)
class KV:
    key: str
    vtype: int
    value: object            # int/float/bool, bytes for a string, a list for an array
    sub_type: int | None = None


@dataclass(frozen=True)
class Tensor:
    name: str
    ne: tuple[int, ...]      # ggml order: ne0 (the row) first
    type_id: int
    data: bytes


@dataclass(frozen=True)
class Template:
    """A clean model, read once: what every mutation starts from."""

    name: str
    arch: str
    kvs: tuple[KV, ...]
    tensors: tuple[Tensor, ...]

    def kv(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)


@dataclass(frozen=True)
class Mutation:
    """One change to a template, as a recipe (a picklable `edit` applied when the file is written), so that
    thousands of mutations of a 49k-token model take no memory until each is written."""

    kind: str                # "clean", "retype", "reshape", "drop", "duplicate", "extra", "kv", "tokenizer", "token"
    what: str                # one line for reports
    edit: object = None      # functools.partial(fn, ...): fn(kvs list, tensors list) edits them in place
    duplicate: str | None = None   # a tensor whose name is to appear twice (the gguf package refuses to write it)

    def apply(self, template: Template) -> tuple[list[KV], list[Tensor]]:
        kvs, tensors = list(template.kvs), list(template.tensors)
        if self.edit is not None:
            self.edit(kvs, tensors)
        return kvs, tensors


def read_template(path: Path, name: str) -> Template:
    import gguf

    reader = gguf.GGUFReader(path)
    kvs = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = int(field.types[0])
        if vtype == ARR:
            sub = int(field.types[-1])
            if sub == STR:
                value: object = [bytes(field.parts[i]) for i in field.data]
            else:
                value = np.concatenate([field.parts[i] for i in field.data]).tolist()
            kvs.append(KV(key, vtype, value, sub))
        elif vtype == STR:
            kvs.append(KV(key, vtype, bytes(field.parts[field.data[0]])))
        else:
            kvs.append(KV(key, vtype, field.parts[field.data[0]][0].item()))
    tensors = tuple(Tensor(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), bytes(t.data.tobytes()))
                    for t in reader.tensors)
    arch = next(kv.value.decode() for kv in kvs if kv.key == "general.architecture")
    return Template(name, arch, tuple(kvs), tensors)


# ---- edits: module-level functions, so that a partial of one pickles to a worker ----

def _n_bytes(ne: tuple[int, ...], type_id: int) -> int | None:
    """Bytes of a tensor of shape `ne` and type `type_id`, None if its rows are not whole blocks (an unknown
    type is given 4 bytes an element)."""
    _, block, size = GGML_TYPES.get(type_id, ("", 1, 4))
    if ne[0] % block:
        return None
    return math.prod(ne) // block * size


def _retype(index: int, type_id: int, seed: int, kvs: list, tensors: list) -> None:
    t = tensors[index]
    n = _n_bytes(t.ne, type_id)
    n = len(t.data) if n is None else n  # rows not whole blocks: the validator has to refuse the type anyway
    tensors[index] = Tensor(t.name, t.ne, type_id, random.Random(seed).randbytes(n))


def _reshape(index: int, ne: tuple[int, ...], kvs: list, tensors: list) -> None:
    t = tensors[index]
    n = _n_bytes(ne, t.type_id)
    tensors[index] = Tensor(t.name, ne, t.type_id, (t.data * (n // len(t.data) + 1))[:n])


def _drop_tensor(index: int, kvs: list, tensors: list) -> None:
    del tensors[index]


def _extra_tensor(index: int, name: str, kvs: list, tensors: list) -> None:
    tensors.append(dataclasses.replace(tensors[index], name=name))


def _set_kv(key: str, kv: KV | None, kvs: list, tensors: list) -> None:
    at = next((i for i, k in enumerate(kvs) if k.key == key), None)
    if at is None:
        if kv is not None:
            kvs.append(kv)
    elif kv is None:
        del kvs[at]
    else:
        kvs[at] = kv


def _reshape_array(key: str, how: str, sub_type: int | None, kvs: list, tensors: list) -> None:
    """An array made shorter, longer, empty or of another element type (of the same length)."""
    old = next(k for k in kvs if k.key == key)
    v = old.value
    if how == "retype":
        filler = {STR: b"x", F32: 0.5, BOOL: True}.get(sub_type, 1)
        new = KV(key, ARR, [filler] * len(v), sub_type)
    else:
        new = KV(key, ARR, {"shorter": v[:-1], "one": v[:1], "empty": [], "longer": v + v[-1:]}[how], old.sub_type)
    _set_kv(key, new, kvs, tensors)


def _fill_array(key: str, value: object, kvs: list, tensors: list) -> None:
    old = next(k for k in kvs if k.key == key)
    _set_kv(key, KV(key, ARR, [value] * len(old.value), old.sub_type), kvs, tensors)


def _set_elements(key: str, changes: tuple[tuple[int, object], ...], kvs: list, tensors: list) -> None:
    """Array elements changed; a value given as ("copy", j) takes element j's value."""
    old = next(k for k in kvs if k.key == key)
    new = list(old.value)
    for i, value in changes:
        new[i] = old.value[value[1]] + (value[2] if len(value) > 2 else b"") if isinstance(value, tuple) else value
    _set_kv(key, KV(key, ARR, new, old.sub_type), kvs, tensors)


# ---- the mutations ----

def _writable_types() -> set[int]:
    import gguf

    return {int(t) for t in gguf.GGMLQuantizationType}


def _n_layer(template: Template) -> int:
    kv = template.kv(f"{template.arch}.block_count")
    return int(kv.value) if kv else 1


def _tensor_mutations(template: Template) -> list[Mutation]:
    out = []
    for i, t in enumerate(template.tensors):
        for type_id in [*GGML_TYPES, *UNKNOWN_TYPE_IDS]:
            if type_id != t.type_id:
                name = GGML_TYPES.get(type_id, (f"type {type_id}",))[0]
                out.append(Mutation("retype", f"{t.name} {GGML_TYPES[t.type_id][0]} -> {name}",
                                    partial(_retype, i, type_id, 1000 * i + type_id)))
        shapes = []
        if len(t.ne) >= 2:
            shapes += [(t.ne[1], t.ne[0], *t.ne[2:]), (t.ne[0] * t.ne[1], *t.ne[2:]), (*t.ne[:-1], t.ne[-1] + 1),
                       (*t.ne[:-1], max(1, t.ne[-1] // 2))]
        if len(t.ne) == 3:
            shapes += [(t.ne[0], t.ne[2], t.ne[1]), (t.ne[0], t.ne[1] * t.ne[2])]
        shapes += [(*t.ne, 1), (*t.ne, 2), (t.ne[0] * 2, *t.ne[1:]), (max(32, t.ne[0] // 2), *t.ne[1:]),
                   (t.ne[0] + 32, *t.ne[1:]), (1,) * len(t.ne)]
        for ne in dict.fromkeys(shapes):
            if ne != t.ne and len(ne) <= 4 and _n_bytes(ne, t.type_id) is not None:
                out.append(Mutation("reshape", f"{t.name} {list(t.ne)} -> {list(ne)}", partial(_reshape, i, ne)))
        out.append(Mutation("drop", f"{t.name} dropped", partial(_drop_tensor, i)))
        out.append(Mutation("duplicate", f"{t.name} twice", duplicate=t.name))
    n_layer = _n_layer(template)
    for i, t in enumerate(template.tensors[:8]):
        for extra in {t.name.replace("blk.0.", f"blk.{n_layer}."), t.name + ".extra", "blk.0.unknown.weight"}:
            if extra != t.name:
                out.append(Mutation("extra", f"extra tensor {extra} (copy of {t.name})",
                                    partial(_extra_tensor, i, extra)))
    return out


_HUGE_INTS = {U8: 255, I8: -128, U16: 65535, I16: -32768, U32: 2**32 - 1, I32: -(2**31), U64: 2**64 - 1,
              I64: -(2**63)}


def _scalar_variants(kv: KV, n_layer: int) -> list[KV]:
    key, v = kv.key, kv.value
    out = [KV(key, STR, str(v).encode()), KV(key, ARR, [v], kv.vtype), KV(key, ARR, [v] * n_layer, kv.vtype)]
    if kv.vtype in _INTS or kv.vtype == BOOL:
        out += [KV(key, U32, 0), KV(key, I32, -1), KV(key, U32, 2**32 - 1), KV(key, U32, 2**31),
                KV(key, U64, 2**63), KV(key, I64, -(2**40)), KV(key, F32, float(v)), KV(key, BOOL, True),
                KV(key, kv.vtype, _HUGE_INTS.get(kv.vtype, 1)), KV(key, U32, int(v) + 1),
                KV(key, ARR, [0] * n_layer, U32), KV(key, ARR, [-1] * n_layer, I32),
                KV(key, ARR, [2**32 - 1] * n_layer, U32), KV(key, ARR, [int(v)] * (n_layer + 1), U32),
                KV(key, ARR, [int(v)] + [0] * (n_layer - 1), U32), KV(key, ARR, [float(v)] * n_layer, F32),
                KV(key, ARR, [str(v).encode()] * n_layer, STR), KV(key, ARR, [], U32)]
    elif kv.vtype in (F32, F64):
        out += [KV(key, kv.vtype, x) for x in (0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e38)]
        out += [KV(key, U32, 1), KV(key, ARR, [float("nan")] * n_layer, F32), KV(key, F64, float(v))]
    elif kv.vtype == STR:
        out += [KV(key, U32, 1), KV(key, STR, b""), KV(key, STR, v + b"\x00tail"), KV(key, STR, b"\xff\xfe"),
                KV(key, STR, b"x" * 100_000), KV(key, ARR, [], STR)]
    return out


def _rename_arch(arch: str, kvs: list, tensors: list) -> None:
    """general.architecture set to `arch`, and every key of the old architecture's namespace moved to the new
    one, as a converter that picked the wrong architecture would write the file."""
    old = next(kv.value.decode() for kv in kvs if kv.key == "general.architecture") + "."
    for i, kv in enumerate(kvs):
        if kv.key == "general.architecture":
            kvs[i] = KV(kv.key, STR, arch.encode())
        elif kv.key.startswith(old):
            kvs[i] = dataclasses.replace(kv, key=arch + "." + kv.key[len(old):])


# Other architectures a file can claim to be (llama.cpp's names), chosen across families: dense, MoE, with
# biases, sliding-window, recurrent, encoder-only, encoder-decoder.
_OTHER_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "qwen2moe", "mistral3", "granite", "olmo", "olmoe",
                "smollm3", "gemma", "gemma2", "gemma3", "phi3", "starcoder2", "mamba", "rwkv6", "bert", "t5", "deci",
                "falcon", "gpt2", "stablelm", "command-r", "exaone", "internlm2", "minicpm", "dbrx", "deepseek2",
                "jamba", "nemotron_h", "lfm2", "unknown-arch")


def _arch_mutations(template: Template) -> list[Mutation]:
    out = []
    for arch in _OTHER_ARCHS:
        if arch != template.arch:
            out.append(Mutation("arch", f"architecture {template.arch} -> {arch}, keys renamed",
                                partial(_rename_arch, arch)))
            new = KV("general.architecture", STR, arch.encode())
            out.append(Mutation("arch", f"architecture {template.arch} -> {arch}, keys kept",
                                partial(_set_kv, new.key, new)))
    return out


def _array_mutations(kv: KV) -> list[Mutation]:
    key = kv.key
    out = [Mutation("kv", f"{key}: array made {how}", partial(_reshape_array, key, how, None))
           for how in ("shorter", "one", "empty", "longer")]
    out += [Mutation("kv", f"{key}: arr[{sub}] of the same length", partial(_reshape_array, key, "retype", sub))
            for sub in (U8, I32, U32, F32, STR, U64, BOOL) if sub != kv.sub_type]
    out += [Mutation("kv", f"{key}: {_describe(new)}", partial(_set_kv, key, new))
            for new in (KV(key, STR, b"not an array"), KV(key, U32, len(kv.value)))]
    if kv.sub_type in (I32, U32, F32):
        for x in ((-1, 2**31 - 1, 99) if kv.sub_type != F32 else (float("nan"), float("inf"), -1e30)):
            if not (kv.sub_type == U32 and x < 0):
                out.append(Mutation("kv", f"{key}: every element {x}", partial(_fill_array, key, x)))
    return out


_TOKENIZER_MODELS = (b"llama", b"gpt2", b"bert", b"t5", b"rwkv", b"plamo2", b"gemma4", b"none", b"no_vocab",
                     b"test", b"hybriddna", b"whitespace", b"", b"unknown")
_TOKENIZER_PRES = (b"default", b"llama3", b"qwen2", b"gpt-4o", b"deepseek-llm", b"kimi-k2", b"gemma4", b"unknown", b"")


def _kv_mutations(template: Template) -> list[Mutation]:
    n_layer = _n_layer(template)
    out = []
    for kv in template.kvs:
        kind = "tokenizer" if kv.key in ("tokenizer.ggml.model", "tokenizer.ggml.pre") else "kv"
        if kv.vtype == ARR:
            out += _array_mutations(kv)
            variants: list[KV | None] = []
        else:
            variants = list(_scalar_variants(kv, n_layer))
        if kv.key == "tokenizer.ggml.model":
            variants += [KV(kv.key, STR, m) for m in _TOKENIZER_MODELS if m != kv.value]
        if kv.key == "tokenizer.ggml.pre":
            variants += [KV(kv.key, STR, m) for m in _TOKENIZER_PRES if m != kv.value]
        variants.append(None)  # the key removed
        out += [Mutation(kind, f"{kv.key}: {_describe(kv)} -> {_describe(new)}", partial(_set_kv, kv.key, new))
                for new in variants]
    arch = template.arch
    for key, vtype, value in ((f"{arch}.expert_count", U32, 4), (f"{arch}.expert_used_count", U32, 2),
                              (f"{arch}.expert_used_count", ARR, [0] * n_layer),
                              (f"{arch}.expert_group_count", U32, 2), (f"{arch}.attention.key_length", U32, 7),
                              (f"{arch}.attention.sliding_window", U32, 0),
                              (f"{arch}.rope.scaling.type", STR, b"yarn"), (f"{arch}.rope.scaling.factor", F32, -1.0),
                              (f"{arch}.pooling_type", U32, 99), (f"{arch}.attention.causal", BOOL, False),
                              ("tokenizer.ggml.scores", ARR, [0.0]), ("tokenizer.ggml.add_eos_token", BOOL, True)):
        if template.kv(key) is None:
            sub = (U32 if key.endswith("count") else F32) if vtype == ARR else None
            new = KV(key, vtype, value, sub)
            out.append(Mutation("kv", f"{key} added: {_describe(new)}", partial(_set_kv, key, new)))
    return out


def _describe(kv: KV | None) -> str:
    if kv is None:
        return "(removed)"
    names = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "str", 9: "arr",
             10: "u64", 11: "i64", 12: "f64"}
    if kv.vtype == ARR:
        return f"arr[{names.get(kv.sub_type)}] x{len(kv.value)} {kv.value[:3]!r:.60}"
    return f"{names[kv.vtype]} {kv.value!r:.60}"


def _token_mutations(template: Template, seed: int) -> list[Mutation]:
    tokens_kv = template.kv("tokenizer.ggml.tokens")
    if tokens_kv is None:
        return []
    key, n = tokens_kv.key, len(tokens_kv.value)
    picks = sorted({0, 1, 2, 10, 200, n // 2, n - 1, *random.Random(seed).sample(range(n), 3)})
    out = []
    for i in picks:
        j = (i + 7) % n
        token = tokens_kv.value[i]
        for value, what in ((token + b"\x00", "ends in NUL"), (b"\x00" + token, "starts with NUL"),
                            (b"\x00", "is a NUL byte"), (("copy", j, b"\x00x"), f"is token {j} + NUL + x"),
                            (("copy", j), f"repeats token {j}"), (b"", "is empty"),
                            (b"[EMPTY_%d]" % j, f"names the empty token {j}"), (b"\xff\xfe\x80", "is invalid UTF-8"),
                            (b"<0x0A>", "is <0x0A>"), (b"a" * 5000, "is 5000 bytes long")):
            out.append(Mutation("token", f"token {i} {what}", partial(_set_elements, key, ((i, value),))))
        out.append(Mutation("token", f"tokens {i} and {j} empty", partial(_set_elements, key, ((i, b""), (j, b"")))))
    types_kv = template.kv("tokenizer.ggml.token_type")
    if types_kv is not None:
        for i in picks[:6]:
            for t in (0, 2, 3, 4, 5, 6, 7, 99, -1):
                if t != types_kv.value[i]:
                    out.append(Mutation("token", f"token {i} typed {t}",
                                        partial(_set_elements, types_kv.key, ((i, t),))))
        out.append(Mutation("token", "every token typed BYTE", partial(_fill_array, types_kv.key, 6)))
    merges_kv = template.kv("tokenizer.ggml.merges")
    if merges_kv is not None:
        for i in (0, 1, len(merges_kv.value) // 2):
            for text in (b"", b" ", b"a", b"a b c", b"\x00 a", b"zz yy", b"a\x00 b", b"\xff \xfe"):
                out.append(Mutation("token", f"merge {i} is {text!r}",
                                    partial(_set_elements, merges_kv.key, ((i, text),))))
    for special in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        for value in (n, n + 1000, 2**31, 2**32 - 1):
            out.append(Mutation("token", f"{special} = {value}", partial(_set_kv, special, KV(special, U32, value))))
    return out


def all_mutations(template: Template, seed: int = 0) -> list[Mutation]:
    """Every mutation of `template` (deterministic for a seed), the clean file first."""
    return [Mutation("clean", "unchanged"), *_tensor_mutations(template), *_kv_mutations(template),
            *_arch_mutations(template), *_token_mutations(template, seed)]


def sample(mutations: list[Mutation], count: int, seed: int) -> list[Mutation]:
    """`count` mutations (all when count >= len), spread over the kinds round-robin so that every kind is
    represented however small the count; the clean file always comes first."""
    if count >= len(mutations):
        return list(mutations)
    rng = random.Random(seed)
    by_kind: dict[str, list[Mutation]] = defaultdict(list)
    for m in mutations:
        by_kind[m.kind].append(m)
    for group in by_kind.values():
        rng.shuffle(group)
    chosen: list[Mutation] = by_kind.pop("clean", [])[:1]
    kinds = sorted(by_kind)
    while len(chosen) < count and kinds:
        for kind in list(kinds):
            if not by_kind[kind]:
                kinds.remove(kind)
            elif len(chosen) < count:
                chosen.append(by_kind[kind].pop())
    return chosen


# ---- writing a mutated file ----

# Packed bytes of the template's big arrays (49k tokens, 49k merges), keyed by the list's identity: packing them
# takes most of a write, and most mutations leave them as they are. The list is kept alive with its bytes.
_PACKED: dict[tuple[int, int, int | None], tuple[list, bytes]] = {}


def _writer(path: Path, arch: str):
    """A gguf.GGUFWriter that also writes empty arrays (the package refuses them; llama.cpp must cope), and
    packs an unchanged big array once."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                prefix = self._pack("I", vtype) if add_vtype else b""
                return prefix + self._pack("I", sub_type) + self._pack("Q", 0)
            if vtype == gguf.GGUFValueType.ARRAY and len(val) > 1000:
                key = (id(val), int(add_vtype), sub_type)
                cached = _PACKED.get(key)
                if cached is None or cached[0] is not val:
                    cached = _PACKED[key] = (val, super()._pack_val(val, vtype, add_vtype, sub_type))
                return cached[1]
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, arch)


def write(template: Template, mutation: Mutation, path: Path) -> None:
    import gguf

    kvs, tensors = mutation.apply(template)
    writer = _writer(path, template.arch)
    # the writer adds it; the template's own one (or its mutation) goes in its place
    writer.kv_data[0].pop("general.architecture", None)
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, gguf.GGUFValueType(kv.vtype),
                             sub_type=gguf.GGUFValueType(kv.sub_type) if kv.sub_type is not None else None)
    unwritable = {}  # tensor -> ggml type id the gguf package has no name for: written as F32, patched after
    known = _writable_types()
    for t in tensors:
        raw = gguf.GGMLQuantizationType(t.type_id if t.type_id in known else 0)
        if t.type_id not in known:
            unwritable[t.name] = t.type_id
        writer.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), len(t.data), raw_dtype=raw)
    if mutation.duplicate is not None:
        original = next(t for t in tensors if t.name == mutation.duplicate)
        stand_in = dataclasses.replace(original, name="#" + original.name[1:])  # same length: renamed after writing
        writer.add_tensor_info(stand_in.name, tuple(reversed(original.ne)), np.dtype(np.float32), len(original.data),
                               raw_dtype=gguf.GGMLQuantizationType(original.type_id))
        tensors.append(stand_in)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(np.frombuffer(t.data, dtype=np.uint8))
    writer.close()
    if unwritable or mutation.duplicate is not None:
        _patch(path, unwritable, mutation.duplicate)


def _patch(path: Path, types: dict[str, int], duplicate: str | None) -> None:
    """Write what the gguf package refuses: a ggml type id it does not know, a tensor name twice."""
    data = bytearray(path.read_bytes())
    for name, type_id in types.items():
        entry = len(name).to_bytes(8, "little") + name.encode()
        at = data.index(entry) + len(entry)
        n_dims = int.from_bytes(data[at:at + 4], "little")
        type_at = at + 4 + 8 * n_dims
        data[type_at:type_at + 4] = type_id.to_bytes(4, "little")
    if duplicate is not None:
        stand_in = ("#" + duplicate[1:]).encode()
        at = data.index(len(stand_in).to_bytes(8, "little") + stand_in) + 8
        data[at:at + len(stand_in)] = duplicate.encode()
    path.write_bytes(bytes(data))


# ---- running cases in workers ----

@dataclass(frozen=True)
class Result:
    case: int
    model: str
    what: str
    kind: str                # "typed", "ok", "untyped", "crash", "hang"
    error: str = ""
    message: str = ""

    def __str__(self) -> str:
        return f"[{self.model} #{self.case}] {self.what}: {self.kind} {self.error} {self.message[:300]}"


def exercise(path: Path) -> str:
    """What a user does with a model file: load it, tokenize, generate a token, detokenize every token."""
    import llmplace

    with llmplace.load(path, progress=False) as model:
        tokens = model.tokenize(PROMPT, parse_special=True)
        model.tokenize(PROMPT)
        reply = llmplace.generate(model, PROMPT, max_tokens=1, temperature=0)
        model.detokenize(range(model.n_vocab))
        return f"{len(tokens)} prompt tokens, reply {reply.text!r:.40}"


def _worker(job_path: str) -> None:
    """Worker process: run the cases of a job file in order, reporting each one before and after."""
    from llmplace.errors import LlmplaceError

    with open(job_path, "rb") as f:
        templates, cases, folder = pickle.load(f)
    for case, model, mutation in cases:
        print("START " + json.dumps(case), flush=True)
        path = Path(folder) / f"{model}-{case}.gguf"
        try:
            write(templates[model], mutation, path)
        except Exception as exc:  # noqa: BLE001 - a mutation this module cannot write is the test's own bug
            report = dict(kind="unwritable", error=type(exc).__name__, message=str(exc)[:300])
        else:
            try:
                report = dict(kind="ok", message=exercise(path))
            except LlmplaceError as exc:
                report = dict(kind="typed", error=type(exc).__name__, message=str(exc)[:400])
            except BaseException as exc:  # noqa: BLE001 - reported, it is what the test looks for
                report = dict(kind="untyped", error=type(exc).__name__, message=str(exc)[:400])
            finally:
                path.unlink(missing_ok=True)
        print("DONE " + json.dumps(dict(case=case, **report)), flush=True)


def run(templates: dict[str, Template], cases: list[tuple[int, str, Mutation]], *, workers: int = 2,
        case_timeout: float = 60.0, confirm: bool = True) -> list[Result]:
    """Run every (case id, model name, mutation) in `workers` processes; return one Result per case.

    A worker that dies or stalls is replaced, and the rest of its cases go on in the new one. A crash or hang is
    then rerun alone in a fresh interpreter (confirm=True): its Result says whether it happens by itself."""
    folder = tempfile.mkdtemp(prefix="gguf-structure-")
    shares = [cases[i::workers] for i in range(workers)]
    results: dict[int, Result] = {}
    lock = threading.Lock()
    threads = [threading.Thread(target=_drive, args=(templates, share, folder, case_timeout, results, lock))
               for share in shares if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for case, model, mutation in cases:
            r = results[case]
            if confirm and r.kind in ("crash", "hang"):
                alone = _run_alone(templates[model], mutation, folder, case_timeout)
                results[case] = dataclasses.replace(r, message=f"{r.message} | alone: {alone}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a crashed case leaves its file behind
    return [results[case] for case, _, _ in cases]


def _drive(templates, share, folder, case_timeout, results, lock) -> None:
    described = {case: (model, mutation.what) for case, model, mutation in share}
    pending = list(share)
    # no gdb backtrace on an abort: it takes seconds and the report names the case anyway
    env = dict(os.environ, LLMPLACE_LOG="critical", GGML_NO_BACKTRACE="1")
    tests_dir = str(Path(__file__).parent)
    while pending:
        job = Path(folder) / f"job-{pending[0][0]}.pickle"
        with open(job, "wb") as f:
            pickle.dump(({m: templates[m] for _, m, _ in pending}, pending, folder), f)
        proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {tests_dir!r}); "
                                 f"import gguf_mutations; gguf_mutations._worker({str(job)!r})"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tempfile.gettempdir())  # the checkout's llmplace/ would hide the installed one
        lines: queue.Queue = queue.Queue()
        # The readers take this job's pipe and collection as arguments: the loop rebinds the names for the next job.
        threading.Thread(target=lambda out, into: [into.put(x) for x in out] + [into.put(None)],
                         args=(proc.stdout, lines), daemon=True).start()
        stderr_tail: list[str] = []
        threading.Thread(target=lambda err, tail: [tail.append(x) or tail.__delitem__(slice(0, -40)) for x in err],
                         args=(proc.stderr, stderr_tail), daemon=True).start()
        current = None
        failure = None
        while True:
            try:
                line = lines.get(timeout=case_timeout)
            except queue.Empty:
                proc.kill()
                failure = "hang"
                break
            if line is None:
                failure = "crash" if current is not None else None
                break
            if line.startswith("START "):
                current = json.loads(line[6:])
            elif line.startswith("DONE "):
                data = json.loads(line[5:])
                model, what = described[data["case"]]
                with lock:
                    results[data["case"]] = Result(data["case"], model, what, data["kind"], data.get("error", ""),
                                                   data.get("message", ""))
                current = None
        proc.wait()
        job.unlink(missing_ok=True)
        if current is None and not (set(results) & {c[0] for c in pending}):
            raise RuntimeError(f"a worker ended before its first case: {''.join(stderr_tail)[-2000:]}")
        if failure is not None and current is not None:
            model, what = described[current]
            tail = "".join(stderr_tail)[-600:]
            with lock:
                results[current] = Result(current, model, what, failure, f"rc={proc.returncode}", tail)
        done = set(results)
        pending = [c for c in pending if c[0] not in done]


def _run_alone(template: Template, mutation: Mutation, folder: str, timeout: float) -> str:
    """Rerun one mutation by itself through tests/isolation.py; returns its outcome in words."""
    from isolation import outcome

    path = Path(folder) / "alone.gguf"
    write(template, mutation, path)
    try:
        result = outcome(f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from gguf_mutations import exercise
            expect_typed(lambda: exercise({str(path)!r}))
        """, timeout=timeout)
    finally:
        path.unlink(missing_ok=True)
    return f"{result.kind} rc={result.returncode} {result.stderr[-300:]}"


def counts(results: list[Result]) -> dict[str, int]:
    tally: dict[str, int] = defaultdict(int)
    for r in results:
        tally[r.kind] += 1
    return dict(tally)


def cases_for(templates: dict[str, Template], count: int, seed: int) -> list[tuple[int, str, Mutation]]:
    """`count` cases in all, shared evenly between the templates, numbered from 0."""
    cases = []
    for k, (name, template) in enumerate(sorted(templates.items())):
        share = count // len(templates) + (k < count % len(templates))
        cases += [(name, m) for m in sample(all_mutations(template, seed), share, seed + k)]
    return [(i, name, m) for i, (name, m) in enumerate(cases)]


def _main() -> int:
    """Manual runs with more cases than CI: python tests/gguf_mutations.py --count 1500"""
    import argparse
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    import models

    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llmplace-structure-fuzz")
    args = parser.parse_args()
    args.cache.mkdir(exist_ok=True)
    templates = {name: read_template(models.synthetic_path(args.cache, f"tiny-{name}"), name)
                 for name in ("llama", "qwen3moe")}
    cases = cases_for(templates, args.count, args.seed)
    start = time.perf_counter()
    results = run(templates, cases, workers=args.workers)
    for r in results:
        if r.kind not in ("typed", "ok"):
            print(r)
    print(f"{len(results)} cases in {time.perf_counter() - start:.0f} s: {counts(results)}")
    return 0


if __name__ == "__main__":
    # run as the module `gguf_mutations`, not `__main__`, so that what it pickles for the workers unpickles there
    sys.path.insert(0, str(Path(__file__).parent))
    import gguf_mutations

    sys.exit(gguf_mutations._main())
