"""Check a GGUF file's header, key/values and tensor table before llama.cpp parses it.

llama.cpp's own parser rejects most malformed files, but it reports them as one generic "failed to load",
and the code that runs after it trusts what it parsed (an array of the wrong type reaches a GGML_ASSERT that
aborts the process). This reader walks the metadata part of the file with bounds-checked reads, never the
tensor data, and never allocates by a count read from the file: a 16 GB model validates in milliseconds and
a damaged one raises `ModelLoadError` naming the byte offset, key or tensor at fault.

The rules are those of the pinned llama.cpp's gguf.cpp, plus a few stricter ones no real model breaks
(every dimension >= 1, a tensor name that is not empty, data ranges that do not overlap). Beyond the format, it
refuses well-formed content that llama.cpp loads and then aborts or crashes on, at the first decode or the first
tokenization: a weight of a type ggml's kernels cannot compute with in its role, a vocabulary llama.cpp cannot
tokenize or detokenize, hyperparameters (scalar or per layer) that its graph asserts on.

It is llmplace's one GGUF reader: the same pass gives the key/values, the tensor table and the layout (`read`),
which gguf_info, placement and planning use, so a file is parsed once (cached by path, size and modification
time), with one table of ggml types. The `gguf` package is used only to write files (synthetic models).
"""

from __future__ import annotations

import array
import functools
import itertools
import sys
import mmap
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSOR_NAME = 63          # GGML_MAX_NAME (64) less the terminating NUL
MAX_DIMS = 4                  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1
MAX_LAYERS = 512              # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024            # LLAMA_MAX_EXPERTS
ROPE_SCALING_TYPES = {b"none", b"linear", b"yarn", b"longrope"}
FIX = "the file is damaged or truncated, or not a GGUF model; re-download or re-convert it"
# For a well-formed file whose content llama.cpp cannot run (a weight type, a vocabulary, a hyperparameter).
FIX_CONTENT = ("llama.cpp cannot run the file as written (a converter's or quantizer's bug, an edited or damaged "
               "file); re-download or re-convert it")

# ggml's type traits at the pinned commit: id -> (name, elements per block, bytes per block), the one table
# llmplace sizes tensors by (their bytes here, block sizes for placement). Taken from ggml itself, not from
# the `gguf` package, whose table lacks Q2_0 and gives Q8_1 a stale size (40, not 36);
# tests/test_gguf_fuzz.py checks every entry against ggml_blck_size / ggml_type_size of the compiled ggml.
# Ids 4, 5 and 31-33, 36-38 were removed from ggml: a file using them cannot be loaded.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

GGML_TYPE_IDS: dict[str, int] = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}


def block_size(type_name: str) -> int:
    """Elements per quantization block of a ggml type, by name ("Q4_K" -> 256)."""
    return GGML_TYPES[GGML_TYPE_IDS[type_name]][1]


# What ggml's CPU kernels accept, per role of a weight (the pinned ggml-cpu: binary-ops.cpp, ops.cpp and the
# type traits in ggml-cpu.c). A file that breaks these loads without complaint and then aborts or crashes the
# process at its first decode, so they are checked here. The CPU backend runs whatever a GPU backend does not
# take, so its limits are the ones every file has to meet.
# - A 1-D weight (a norm's gain, a bias, a scale) meets the activations in an element-wise op (ggml_mul,
#   ggml_add) whose CPU kernel takes an F32 activation with an F32 operand only (anything else is
#   GGML_ABORT "unsupported types"). Converters and llama-quantize keep every 1-D tensor F32.
ELEMENTWISE_TYPES = {0}
# - A weight of 2 or more dimensions is multiplied (ggml_mul_mat / mul_mat_id) or its rows are looked up
#   (ggml_get_rows, token embeddings, which are the output matrix too when it is tied). Types without a CPU
#   dot-product kernel (vec_dot) are called through a NULL pointer: Q8_1 and Q8_K (intermediate types of the
#   kernels, never stored), the integer types and F64.
NO_MATMUL_TYPES = {9, 15, 24, 25, 26, 27, 28}

_LAYER = re.compile(r"^blk\.(\d+)\.")  # a layer's tensors: "blk.<N>.<name>"

# GGUF value types: id -> (name, struct format of one element, its size). 8 is a string, 9 an array.
STRING, ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("uint8", "B", 1), 1: ("int8", "b", 1), 2: ("uint16", "H", 2), 3: ("int16", "h", 2),
    4: ("uint32", "I", 4), 5: ("int32", "i", 4), 6: ("float32", "f", 4), 7: ("bool", "B", 1),
    10: ("uint64", "Q", 8), 11: ("int64", "q", 8), 12: ("float64", "d", 8),
}
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, STRING: "string", ARRAY: "array"}

# Keys llama.cpp reads with accessors that assert (abort the process) or read out of bounds on a wrong type
# or length instead of failing the load: key -> (kv type, array element type or None).
_TYPED_KEYS: dict[str, tuple[int, int | None]] = {
    "general.alignment": (4, None),
    "general.architecture": (STRING, None),
    "tokenizer.ggml.model": (STRING, None),
    "tokenizer.ggml.tokens": (ARRAY, STRING),
    "tokenizer.ggml.token_type": (ARRAY, 5),
    "tokenizer.ggml.merges": (ARRAY, STRING),
}

# String arrays whose entries must differ: a repeated token fails a GGML_ASSERT in llama-vocab.cpp (the
# process aborts) instead of failing the load. Found by tests/test_gguf_fuzz.py.
_DISTINCT_STRINGS = {"tokenizer.ggml.tokens"}

# Numeric arrays whose values the checks read: per-layer hyperparameters (at most LLAMA_MAX_LAYERS long) and
# the token types. Arrays are otherwise skipped, never copied.
_READ_ARRAYS_UP_TO = MAX_LAYERS
_READ_ARRAYS = {"tokenizer.ggml.token_type"}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_STRUCTS = {fmt: struct.Struct("<" + fmt) for _, fmt, _ in _SCALARS.values()}


@dataclass(frozen=True)
class GGUFLayout:
    """What validation learned about a file (and so what llama.cpp will see)."""

    version: int
    n_kv: int
    n_tensors: int
    alignment: int
    data_offset: int          # where the tensor data section starts
    data_size: int            # bytes from data_offset to the end of the last tensor


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]      # GGUF order: ne0 (the contiguous dimension) first
    dtype: str                  # ggml type name: "F32", "Q4_0", "Q4_K" ...
    n_bytes: int
    offset: int                 # byte offset of the data in the file
    layer: int | None           # N of "blk.N." names, None for others (embeddings, output ...)


@dataclass(frozen=True)
class GGUFFile:
    """Everything read from a file's metadata part in one pass."""

    layout: GGUFLayout
    metadata: dict[str, object]     # key -> str, int, float, bool or list of them ("<unreadable>": not UTF-8)
    tensors: list[TensorInfo]       # in file order


class _Bad(Exception):
    """Internal: a rule broken at `offset`; validate() turns it into ModelLoadError."""

    def __init__(self, offset: int, message: str, fix: str = FIX) -> None:
        super().__init__(message)
        self.offset, self.fix = offset, fix


class _Reader:
    """Bounds-checked little-endian reads from a read-only buffer (the file, memory-mapped)."""

    def __init__(self, buf, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Bad(self.pos, f"{what} needs {n} bytes but the file ends {self.size - self.pos} bytes later")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def i64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _I64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        value = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return value

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` length-prefixed strings without copying them (a 150k-token vocabulary)."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        try:
            for i in range(count):  # noqa: B007 - the except below names the string by i
                (n,) = unpack(buf, pos)
                pos += 8 + n
        except (struct.error, OverflowError):
            # unpack_from past the end (or past any address): the previous string's length was wrong.
            raise _Bad(pos, f"string {i} of {what} starts past the end of the file (a string length before it "
                            "is wrong)") from None
        if pos > size:
            raise _Bad(self.pos, f"the strings of {what} run {pos - size} bytes past the end of the file")
        self.pos = pos

    def token_texts(self, pos: int, count: int, what: str) -> list[bytes]:
        """The `count` strings at `pos` (bounds-checked by skip_strings) as llama.cpp keys its vocabulary by
        them, refusing a repeated one."""
        # One copy of the region, then slices of bytes: several times faster than slicing the mapping.
        buf, unpack = bytes(self.buf[pos:self.pos]), _U64.unpack_from
        base, pos = pos, 0
        seen: dict[bytes, int] = {}
        with_nul: set[int] = set()
        texts = []
        for i in range(count):
            (n,) = unpack(buf, pos)
            raw = buf[pos + 8:pos + 8 + n]
            # llama.cpp reads a token as a C string, so it ends at a NUL byte; an empty token is named
            # "[EMPTY_<id>]". Either can make two entries one, and a repeated token aborts the load.
            if b"\0" in raw:
                with_nul.add(i)
                raw = raw.split(b"\0", 1)[0]
            text = raw or b"[EMPTY_%d]" % i
            first = seen.setdefault(text, i)
            if first != i:
                cut = [j for j in (first, i) if j in with_nul]
                why = f"; token {cut[0]} holds a NUL byte, and llama.cpp reads a token up to it" if cut else ""
                raise _Bad(base + pos, f"{what} holds the token {text!r} twice (ids {first} and {i}{why}); "
                                       "llama.cpp would abort on it", FIX_CONTENT)
            texts.append(text)
            pos += 8 + n
        return texts


def _key_text(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")


# A key's value as the checks hold it: a number, a string's bytes, or an array's summary ("array", element type,
# count, offset[, values]).
_Value = int | float | bytes | tuple[Any, ...]


def _read_value(r: _Reader, vtype: int, key: str) -> _Value:
    """Read (or skip) one value: scalars and strings are returned, arrays as ("array", element type, length,
    offset), their contents skipped."""
    if vtype in _SCALARS:
        _, fmt, size = _SCALARS[vtype]
        r.need(size, f"the value of key '{key}'")
        (value,) = _STRUCTS[fmt].unpack_from(r.buf, r.pos)
        r.pos += size
        return value
    if vtype == STRING:
        return r.string(f"the value of key '{key}'")
    if vtype != ARRAY:
        raise _Bad(r.pos - 4, f"key '{key}' has unknown value type {vtype} (known: 0-12)")
    start = r.pos
    etype = r.u32(f"the element type of array '{key}'")
    count = r.u64(f"the length of array '{key}'")
    if etype == ARRAY:
        raise _Bad(start, f"array '{key}' holds arrays, which llama.cpp does not read")
    if etype == STRING:
        # Each string takes at least its 8-byte length: a count the rest of the file cannot hold is refused
        # before walking it.
        if count > (r.size - r.pos) // 8:
            raise _Bad(start, f"array '{key}' claims {count} strings, more than the {r.size - r.pos} bytes left "
                              "in the file can hold")
        strings_at = r.pos
        r.skip_strings(count, f"array '{key}'")
        if key in _DISTINCT_STRINGS:
            return ("array", etype, count, start, r.token_texts(strings_at, count, f"array '{key}'"))
        return ("array", etype, count, start)
    if etype not in _SCALARS:
        raise _Bad(start, f"array '{key}' has unknown element type {etype} (known: 0-8, 10-12)")
    size = _SCALARS[etype][2]
    if count > (r.size - r.pos) // size:
        raise _Bad(start, f"array '{key}' claims {count} {_TYPE_NAMES[etype]} values ({count * size} bytes), "
                          f"more than the {r.size - r.pos} bytes left in the file")
    values_at = r.pos
    r.pos += count * size
    if count <= _READ_ARRAYS_UP_TO or key in _READ_ARRAYS:
        values = array.array(_SCALARS[etype][1], r.buf[values_at:r.pos])  # the struct codes are array codes
        if sys.byteorder == "big":
            values.byteswap()
        return ("array", etype, count, start, values.tolist())
    return ("array", etype, count, start)


def _check_kv(r: _Reader, n_kv: int) -> tuple[dict[str, _Value], dict[str, int], dict[str, tuple[int, int]]]:
    """Walk the key/values; returns the values (arrays summarized), where each key starts, and each key's
    GGUF type with where its value ends."""
    values: dict[str, _Value] = {}
    offsets: dict[str, int] = {}
    types: dict[str, tuple[int, int]] = {}
    for i in range(n_kv):
        start = r.pos
        raw = r.string(f"the name of key/value {i}")
        key = _key_text(raw)
        if not raw:
            raise _Bad(start, f"key/value {i} has an empty name")
        if key in values:
            raise _Bad(start, f"key '{key}' appears twice")
        vtype = r.u32(f"the type of key '{key}'")
        value_start = r.pos
        value = _read_value(r, vtype, key)
        expected = _TYPED_KEYS.get(key)
        if expected is not None:
            want, want_elem = expected
            got_elem = value[1] if isinstance(value, tuple) else None
            if vtype != want or (want_elem is not None and got_elem != want_elem):
                want_text = _TYPE_NAMES[want] + (f" of {_TYPE_NAMES[want_elem]}" if want_elem is not None else "")
                got_text = _TYPE_NAMES.get(vtype, str(vtype)) + (
                    f" of {_TYPE_NAMES.get(got_elem, str(got_elem))}" if got_elem is not None else "")
                raise _Bad(value_start, f"key '{key}' must be {want_text}, not {got_text}")
        values[key] = value
        offsets[key] = start
        types[key] = (vtype, r.pos)
    return values, offsets, types


def _check_vocab_arrays(values: dict[str, _Value]) -> None:
    """Per-token arrays shorter than the vocabulary would be indexed past their end (llama.cpp checks this
    too, with a less specific message)."""
    tokens = values.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, tuple):
        return
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        other = values.get(key)
        if isinstance(other, tuple) and other[2] < tokens[2]:
            raise _Bad(other[3], f"array '{key}' has {other[2]} entries but tokenizer.ggml.tokens has {tokens[2]}")


LLAMA_TOKEN_TYPE_BYTE = 6
# Tokenizer models whose vocabulary reads a BYTE-typed token's value from its text "<0xXX>" (llama-vocab.cpp,
# token_to_byte: text.substr(3, 2), which throws through the C API on a shorter text); WPM ("bert") aborts on
# any BYTE-typed token.
_BYTE_TOKENS_AS_HEX = {b"llama", b"t5", b"gpt2", b"hybriddna", b"whitespace", b"gemma4"}
_NO_BYTE_TOKENS = {b"bert"}


def _check_vocab(values: dict[str, _Value], offsets: dict[str, int]) -> None:
    """Vocabularies llama.cpp loads but then aborts on, when text is tokenized or tokens are turned back into
    text (its C++ exceptions there cross the C API, which ends the process)."""
    model = values.get("tokenizer.ggml.model")
    if not isinstance(model, bytes):
        return
    model = model.split(b"\0", 1)[0]  # llama.cpp reads the string as a C string
    at = offsets.get("tokenizer.ggml.model", 0)
    if model in (b"none", b"no_vocab"):
        raise _Bad(at, f"tokenizer.ggml.model is {model.decode()!r}: the model has no vocabulary, and llmplace "
                       "turns text into tokens for every use of a model (llama.cpp aborts on a tokenizer call)",
                   FIX_CONTENT)
    tokens = values.get("tokenizer.ggml.tokens")
    if not (isinstance(tokens, tuple) and len(tokens) > 4):
        return
    texts = tokens[4]
    if model == b"llama":
        # SentencePiece falls back to one token per byte for any piece the vocabulary lacks (byte_to_token:
        # "<0xXX>", or the byte itself); a byte with neither throws std::out_of_range through llama_tokenize.
        known = set(texts)
        missing = [b for b in range(256) if b"<0x%02X>" % b not in known and (b == 0 or bytes([b]) not in known)]
        if missing:
            raise _Bad(at, f"tokenizer.ggml.model is 'llama' (SentencePiece), but the vocabulary has no token for "
                           f"{len(missing)} of the 256 bytes (e.g. <0x{missing[0]:02X}>) to fall back on; llama.cpp "
                           "aborts when text holds one. A byte-level BPE vocabulary is 'gpt2'", FIX_CONTENT)
    types = values.get("tokenizer.ggml.token_type")
    if isinstance(types, tuple) and len(types) > 4 and model in _BYTE_TOKENS_AS_HEX | _NO_BYTE_TOKENS:
        for i, (kind, text) in enumerate(zip(types[4], texts)):
            if kind != LLAMA_TOKEN_TYPE_BYTE:
                continue
            if model in _NO_BYTE_TOKENS:
                raise _Bad(types[3], f"token {i} ({text!r}) is typed BYTE, which a '{model.decode()}' tokenizer does "
                                     "not have (llama.cpp aborts when it turns the token into text)", FIX_CONTENT)
            if not (len(text) == 6 and text.startswith(b"<0x") and text.endswith(b">")):
                raise _Bad(types[3], f"token {i} ({text!r}) is typed BYTE, but a byte token's text must be <0xXX> "
                                     "(llama.cpp aborts when it turns the token into text)", FIX_CONTENT)


# Element types llama.cpp reads a per-layer uint32 array from (get_key_or_arr -> get_arr); others fail the load.
_PER_LAYER_ELEMENT_TYPES = {4, 5, 7}   # uint32, int32 (taken as uint32), bool
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate_inp|(gate|up|down|gate_up)_exps)\.")
_ATTENTION_TENSOR = re.compile(r"blk\.(\d+)\.attn_(q|k|v|qkv|output)\.")
# Architectures whose graph asserts that RoPE turns whole heads (GGML_ASSERT(n_embd_head == n_rot) in the
# pinned src/models/*.cpp), so rope.dimension_count must equal the head size; llama.cpp's loader checks it only
# for llama, deci, falcon and llama-embed, and throws (a failed load) there.
_ROPE_OVER_WHOLE_HEAD = frozenset((
    "apertus arcee arctic baichuan chameleon codeshell cogvlm cohere2moe dbrx deci deepseek dots1 dream ernie4_5 "
    "ernie4_5-moe exaone exaone-moe falcon granite granite_swa graniteswitch grok grovemoe hunyuan-moe hunyuan_vl "
    "hy_v3 internlm2 jais2 llada llada-moe maincoder mistral3 olmo olmoe orion paddleocr pangu-embedded plamo "
    "pockettts qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3vl qwen3vlmoe rnd1 seed_oss smollm3 starcoder2 talkie "
    "xverse").split())


@dataclass(frozen=True)
class _LayerRule:
    """Layers whose hyperparameters leave no room for some tensors (checked against the tensor table)."""

    tensors: re.Pattern          # group 1: the layer number
    layers: frozenset[int]
    key: str
    message: str                 # with {layer}


def _check_hparams(values: dict[str, _Value], offsets: dict[str, int]) -> list[_LayerRule]:
    """The hyperparameters llama.cpp checks with GGML_ASSERT (aborting the process) instead of failing the
    load (llama-model.cpp, load_hparams), or that fail an assertion at the first decode. Found by
    tests/test_gguf_fuzz.py and tests/test_gguf_structure_fuzz.py. A per-layer array is checked element by
    element, as llama.cpp reads it. Returns what the tensor table must then agree with."""
    arch = values.get("general.architecture")
    if not isinstance(arch, bytes):
        return []
    prefix = arch.decode("utf-8", errors="replace") + "."

    def get(name: str, default: int | float = 0) -> int | float:
        value = values.get(prefix + name, default)
        return default if isinstance(value, (tuple, bytes)) else value

    def bad(name: str, message: str) -> _Bad:
        return _Bad(offsets.get(prefix + name, 0), f"key '{prefix}{name}' {message}", FIX_CONTENT)

    def per_layer(name: str, n_layer: int) -> list[int] | None:
        """A per-layer array's values as llama.cpp reads them (uint32), None if it is not an array llama.cpp
        takes (a scalar, or an array it refuses by itself: another element type or length)."""
        value = values.get(prefix + name)
        if not (isinstance(value, tuple) and len(value) > 4 and value[1] in _PER_LAYER_ELEMENT_TYPES
                and value[2] == n_layer):
            return None
        return [v & 0xFFFFFFFF for v in value[4]]

    n_layer = get("block_count", 1)
    if not 1 <= n_layer <= MAX_LAYERS:
        raise bad("block_count", f"is {n_layer}; llama.cpp takes 1 to {MAX_LAYERS} layers")
    if not isinstance(n_layer, int):
        return []  # a float: llama.cpp refuses the key's type itself (a failed load)
    if get("nextn_predict_layers") > n_layer:
        raise bad("nextn_predict_layers", f"is {get('nextn_predict_layers')}, more than block_count {n_layer}")
    n_expert, n_used = get("expert_count"), get("expert_used_count")
    n_groups, n_group_used = get("expert_group_count"), get("expert_group_used_count")
    if n_expert > MAX_EXPERTS:
        raise bad("expert_count", f"is {n_expert}; llama.cpp takes at most {MAX_EXPERTS} experts")
    used_per_layer = per_layer("expert_used_count", n_layer)
    rules: list[_LayerRule] = []
    if used_per_layer is None:
        if n_used > n_expert or (n_expert > 0 and n_used == 0):
            raise bad("expert_used_count", f"is {n_used} with expert_count {n_expert} (must be 1 to expert_count, "
                                           "or 0 without experts)")
    else:
        too_many = [(il, n) for il, n in enumerate(used_per_layer) if n > n_expert]
        if too_many or (n_expert > 0 and not any(used_per_layer)):
            il, n = too_many[0] if too_many else (0, 0)
            raise bad("expert_used_count", f"is a per-layer array whose layer {il} uses {n} experts, with "
                                           f"expert_count {n_expert} (each must be 1 to expert_count, or 0 without "
                                           "experts)")
        if n_expert > 0:
            # llama.cpp builds a layer's expert block with its expert_used_count; with 0 it reads a missing result
            rules.append(_LayerRule(_EXPERT_TENSOR, frozenset(il for il, n in enumerate(used_per_layer) if n == 0),
                                    prefix + "expert_used_count", "routes layer {layer} to 0 experts, but the layer "
                                    "has expert tensors; each layer with experts must use 1 to expert_count of them"))
    # Heads per layer: a layer with attention weights and 0 heads (or 0 key/value heads) builds a graph whose
    # shapes disagree, and ggml asserts. 0 is meaningful only in layers without attention (recurrent layers of
    # hybrid models), so it is checked against the tensor table.
    n_head_layers: Sequence[int | float] = (per_layer("attention.head_count", n_layer)
                                            or [get("attention.head_count", 1)] * n_layer)
    n_head_kv_layers: Sequence[int | float] = per_layer("attention.head_count_kv", n_layer) or (
        n_head_layers if prefix + "attention.head_count_kv" not in values
        else [get("attention.head_count_kv", 1)] * n_layer)
    for name, counts in (("attention.head_count", n_head_layers), ("attention.head_count_kv", n_head_kv_layers)):
        zero = frozenset(il for il, n in enumerate(counts) if n == 0)
        if zero:
            rules.append(_LayerRule(_ATTENTION_TENSOR, zero, prefix + name, "gives layer {layer} 0 heads, but the "
                                    "layer has attention weights (llama.cpp would abort at the first decode)"))
    arch_name = prefix[:-1]
    n_head = n_head_layers[0]
    n_embd = get("embedding_length")
    if arch_name in _ROPE_OVER_WHOLE_HEAD and isinstance(n_head, int) and n_head and isinstance(n_embd, int):
        head_size = get("attention.key_length", n_embd // n_head)
        n_rot = get("rope.dimension_count", head_size)
        if n_rot != head_size:
            raise bad("rope.dimension_count", f"is {n_rot}, but a {arch_name} model's RoPE turns whole heads of "
                                              f"{head_size} (llama.cpp asserts that they are equal)")
    if n_expert > 0 and (n_groups >= n_expert or (n_groups > 1 and (n_expert % n_groups
                                                                     or not 0 < n_group_used < n_groups))):
        raise bad("expert_group_count", f"is {n_groups} with {n_expert} experts and expert_group_used_count "
                                        f"{n_group_used} (groups must divide the experts, more than are used)")
    if n_expert == 0 and n_groups:
        raise bad("expert_group_count", f"is {n_groups} in a model without experts")
    scaling = values.get(prefix + "rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        known = sorted(t.decode() for t in ROPE_SCALING_TYPES)
        raise bad("rope.scaling.type", f"is {scaling!r}; llama.cpp knows {known}")
    for name in ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon"):
        eps = get(name, 0.0)
        if not (isinstance(eps, (int, float)) and 0.0 <= eps < float("inf")):
            raise bad(name, f"is {eps}; a norm epsilon must be a finite number >= 0 (ggml asserts it)")
    return rules


def _check_tensors(r: _Reader, n_tensors: int, alignment: int) -> list[tuple[str, int, int, tuple[int, ...], str]]:
    """Read the tensor table; returns (name, offset, n_bytes, shape, type name) per tensor, in file order (the
    offset counted from the start of the data section)."""
    seen: set[bytes] = set()
    tensors = []
    for i in range(n_tensors):
        start = r.pos
        raw = r.string(f"the name of tensor {i}")
        name = _key_text(raw)
        if not 1 <= len(raw) <= MAX_TENSOR_NAME:
            raise _Bad(start, f"tensor {i} has a name of {len(raw)} bytes (llama.cpp takes 1 to {MAX_TENSOR_NAME})")
        if raw in seen:
            raise _Bad(start, f"tensor name '{name}' appears twice")
        seen.add(raw)
        dims_at = r.pos
        n_dims = r.u32(f"the dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(dims_at, f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)")
        shape: list[int] = []
        n_elements = 1
        for d in range(n_dims):
            dim_at = r.pos
            ne = r.i64(f"dimension {d} of tensor '{name}'")
            if ne < 1:
                raise _Bad(dim_at, f"dimension {d} of tensor '{name}' is {ne} (must be at least 1)")
            n_elements *= ne
            if n_elements > INT64_MAX:
                raise _Bad(dim_at, f"tensor '{name}' has more elements than an int64 counts (shape {shape + [ne]})")
            shape.append(ne)
        type_at = r.pos
        type_id = r.u32(f"the type of tensor '{name}'")
        if type_id not in GGML_TYPES:
            raise _Bad(type_at, f"tensor '{name}' has ggml type {type_id}, which this llama.cpp does not know "
                                "(a newer converter, or a removed type)")
        type_name, block, type_size = GGML_TYPES[type_id]
        if shape[0] % block:
            raise _Bad(type_at, f"tensor '{name}' is {type_name} with rows of {shape[0]} elements, not a multiple "
                                f"of its block size {block}")
        kernel_problem = _kernel_problem(shape, type_id)
        if kernel_problem:
            raise _Bad(type_at, f"tensor '{name}' (shape {shape}) is {type_name}: {kernel_problem}", FIX_CONTENT)
        offset_at = r.pos
        offset = r.u64(f"the data offset of tensor '{name}'")
        if offset % alignment:
            raise _Bad(offset_at, f"tensor '{name}' has data offset {offset}, not a multiple of the alignment "
                                  f"{alignment}")
        tensors.append((name, offset, n_elements // block * type_size, tuple(shape), type_name))
    return tensors


def _kernel_problem(shape: list[int], type_id: int) -> str:
    """Why llama.cpp's kernels cannot compute with a weight of this shape and type ('' when they can)."""
    if len(shape) == 1 and type_id not in ELEMENTWISE_TYPES:
        return ("a 1-D weight (a norm, bias or scale) must be F32: ggml's element-wise kernels take no other type, "
                "and llama.cpp would abort at the first decode")
    if len(shape) > 1 and type_id in NO_MATMUL_TYPES:
        return ("ggml has no matrix-multiplication kernel for this type (it is not a storage type for weights), "
                "and llama.cpp would crash at the first decode")
    return ""


def _check_data(r: _Reader, tensors: list[tuple], alignment: int) -> tuple[int, int]:
    """Check where the tensor data lies; returns (data section offset, its size)."""
    if not tensors:
        return r.pos, 0
    data_offset = -(-r.pos // alignment) * alignment  # the data section starts at the next aligned byte
    room = r.size - data_offset
    if room < 0:
        raise _Bad(r.pos, f"the data section would start at byte {data_offset}, past the end of the file "
                          f"({r.size} bytes)")
    for name, offset, n_bytes, *_ in tensors:
        if offset + n_bytes > room:
            raise _Bad(data_offset + min(offset, room),
                       f"the data of tensor '{name}' "
                       f"(bytes {data_offset + offset} to {data_offset + offset + n_bytes}) "
                       f"lies beyond the end of the file ({r.size} bytes)")
    by_offset = sorted(tensors, key=lambda t: t[1])
    for (prev, prev_offset, prev_bytes, *_), (name, offset, *_) in itertools.pairwise(by_offset):
        if offset < prev_offset + prev_bytes:
            raise _Bad(data_offset + offset, f"the data of tensor '{name}' overlaps that of '{prev}' (offsets "
                                             f"{offset} and {prev_offset}, {prev_bytes} bytes)")
    # llama.cpp also requires table order with only alignment padding between tensors.
    expected = 0
    for name, offset, n_bytes, *_ in tensors:
        if offset != expected:
            raise _Bad(data_offset + offset, f"tensor '{name}' has data offset {offset} but llama.cpp expects "
                                             f"{expected} (tensor data must follow the table's order, padded to "
                                             f"{alignment} bytes)")
        expected += -(-n_bytes // alignment) * alignment
    return data_offset, expected


def _parse(buf, size: int) -> GGUFFile:
    r = _Reader(buf, size)
    r.need(24, "the header")
    if bytes(buf[0:4]) != GGUF_MAGIC:
        raise _Bad(0, f"the file starts with {bytes(buf[0:4])!r}, not b'GGUF'")
    r.pos = 4
    version = r.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(4, f"GGUF version {version} (this llama.cpp reads versions 2 and 3)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key/value count")
    # The smallest key/value takes 14 bytes (8-byte name length, 1-byte name, 4-byte type, 1-byte value), the
    # smallest tensor entry 33: counts the file cannot hold are refused before anything is read by them.
    if n_kv > (size - 24) // 14:
        raise _Bad(16, f"the header claims {n_kv} key/values, more than a file of {size} bytes can hold")
    if n_tensors > (size - 24) // 33:
        raise _Bad(8, f"the header claims {n_tensors} tensors, more than a file of {size} bytes can hold")
    values, offsets, types = _check_kv(r, n_kv)
    _check_vocab_arrays(values)
    _check_vocab(values, offsets)
    layer_rules = _check_hparams(values, offsets)
    alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)  # a uint32 (_TYPED_KEYS)
    if not isinstance(alignment, int) or alignment == 0 or alignment & (alignment - 1):
        raise _Bad(24, f"general.alignment is {alignment!r}, not a power of two")
    tensors = _check_tensors(r, n_tensors, alignment)
    for rule in layer_rules:
        for name, *_ in tensors:
            m = rule.tensors.match(name)
            if m and int(m.group(1)) in rule.layers:
                raise _Bad(offsets.get(rule.key, 0), f"key '{rule.key}' {rule.message.format(layer=m.group(1))} "
                                                     f"({name})", FIX_CONTENT)
    data_offset, data_size = _check_data(r, tensors, alignment)
    layout = GGUFLayout(version=version, n_kv=n_kv, n_tensors=n_tensors, alignment=alignment,
                        data_offset=data_offset, data_size=data_size)
    table = []
    for name, offset, n_bytes, shape, type_name in tensors:
        m = _LAYER.match(name)
        table.append(TensorInfo(name=name, shape=shape, dtype=type_name, n_bytes=n_bytes,
                                offset=data_offset + offset, layer=int(m.group(1)) if m else None))
    return GGUFFile(layout, _metadata(buf, values, types), table)



def _metadata(buf, values: dict[str, _Value], types: dict[str, tuple[int, int]]) -> dict[str, object]:
    """The key/values as Python values: str for a string, bool for a bool, a list for an array (its contents
    read here, from the ranges the checks walked), int or float otherwise. A string that is not UTF-8 makes
    its value "<unreadable>"."""
    result: dict[str, object] = {}
    for key, value in values.items():
        vtype, end = types[key]
        readable: object = value
        try:
            if vtype == STRING and isinstance(value, bytes):
                readable = value.decode("utf-8")
            elif vtype == 7:
                readable = bool(value)
            elif vtype == ARRAY and isinstance(value, tuple):
                readable = _array_contents(buf, value, end)
        except UnicodeDecodeError:
            readable = "<unreadable>"
        result[key] = readable
    return result


def _array_contents(buf, summary: tuple, end: int) -> list:
    """All elements of an array the checks summarized as ("array", element type, count, offset[, values]) and
    found to end at `end`."""
    etype, count, start = summary[1], summary[2], summary[3]
    at = start + 12  # past the element type (u32) and the count (u64)
    if etype == STRING:
        data, unpack, pos, texts = bytes(buf[at:end]), _U64.unpack_from, 0, []
        for _ in range(count):  # lengths bounds-checked by skip_strings
            (n,) = unpack(data, pos)
            texts.append(data[pos + 8:pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        return texts
    if len(summary) > 4 and etype != 7:
        return list(summary[4])
    code, size = _SCALARS[etype][1], _SCALARS[etype][2]
    values = array.array(code, buf[at:at + count * size])
    if sys.byteorder == "big":
        values.byteswap()
    return [bool(v) for v in values] if etype == 7 else values.tolist()


def validate(path: str | Path) -> GGUFLayout:
    """Check the metadata part of a GGUF file; raise ModelLoadError naming what is wrong and where.

    Results are cached per file, keyed by its size and modification time (loads re-validate nothing)."""
    return read(path).layout


def read(path: str | Path) -> GGUFFile:
    """Check a GGUF file as `validate` does, and return what that pass read: key/values, tensor table, layout.
    Cached per file, keyed by its size and modification time: treat the result as read-only."""
    path = Path(path)
    stat = path.stat()
    return _validate(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# Few entries: a result holds the whole vocabulary, and a process works with a model or two at a time.
@functools.lru_cache(maxsize=8)
def _validate(path: str, size: int, mtime_ns: int) -> GGUFFile:  # mtime_ns only keys the cache
    with open(path, "rb") as f:
        if size == 0:
            raise ModelLoadError(f"{path} is empty; {FIX}")
        # A mapping, not a read: only the pages of the header and tables are ever touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(buf, min(size, len(buf)))
            except _Bad as bad:
                raise ModelLoadError(f"{Path(path).name} is not a valid GGUF file: {bad} (at byte {bad.offset}); "
                                     f"{bad.fix}") from None
