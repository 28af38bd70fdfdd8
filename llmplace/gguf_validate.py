"""Check a GGUF file's header, key/values and tensor table before llama.cpp parses it.

llama.cpp's own parser rejects most malformed files, but it reports them as one generic "failed to load",
and the code that runs after it trusts what it parsed (an array of the wrong type reaches a GGML_ASSERT that
aborts the process). This reader walks the metadata part of the file with bounds-checked reads, never the
tensor data, and never allocates by a count read from the file: a 16 GB model validates in milliseconds and
a damaged one raises `ModelLoadError` naming the byte offset, key or tensor at fault.

The rules are those of the pinned llama.cpp's gguf.cpp, plus a few stricter ones no real model breaks
(every dimension >= 1, a tensor name that is not empty, data ranges that do not overlap).
"""

from __future__ import annotations

import functools
import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

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

# ggml's type traits at the pinned commit: id -> (name, elements per block, bytes per block). Taken from
# ggml itself, not from the `gguf` package, whose table lacks Q2_0 and gives Q8_1 a stale size (40, not 36);
# tests/test_gguf_fuzz.py checks this table against the compiled ggml. Ids 4, 5 and 31-33, 36-38 were
# removed from ggml: a file using them cannot be loaded.
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


class _Bad(Exception):
    """Internal: a rule broken at `offset`; validate() turns it into ModelLoadError."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset


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
            for i in range(count):
                (n,) = unpack(buf, pos)
                pos += 8 + n
        except (struct.error, OverflowError):
            # unpack_from past the end (or past any address): the previous string's length was wrong.
            raise _Bad(pos, f"string {i} of {what} starts past the end of the file (a string length before it "
                            "is wrong)") from None
        if pos > size:
            raise _Bad(self.pos, f"the strings of {what} run {pos - size} bytes past the end of the file")
        self.pos = pos

    def check_distinct_strings(self, pos: int, count: int, what: str) -> None:
        """Walk the `count` strings at `pos` (bounds-checked by skip_strings) and refuse a repeated one."""
        # One copy of the region, then slices of bytes: several times faster than slicing the mapping.
        buf, unpack = bytes(self.buf[pos:self.pos]), _U64.unpack_from
        base, pos = pos, 0
        seen: set[bytes] = set()
        for i in range(count):
            (n,) = unpack(buf, pos)
            # llama.cpp names an empty token "[EMPTY_<id>]"; that name can clash too.
            text = buf[pos + 8:pos + 8 + n] if n else b"[EMPTY_%d]" % i
            if text in seen:
                raise _Bad(base + pos, f"{what} holds the token {text!r} twice (at id {i}); llama.cpp would abort "
                                       "on it")
            seen.add(text)
            pos += 8 + n


def _key_text(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")


def _read_value(r: _Reader, vtype: int, key: str) -> object:
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
            r.check_distinct_strings(strings_at, count, f"array '{key}'")
        return ("array", etype, count, start)
    if etype not in _SCALARS:
        raise _Bad(start, f"array '{key}' has unknown element type {etype} (known: 0-8, 10-12)")
    size = _SCALARS[etype][2]
    if count > (r.size - r.pos) // size:
        raise _Bad(start, f"array '{key}' claims {count} {_TYPE_NAMES[etype]} values ({count * size} bytes), "
                          f"more than the {r.size - r.pos} bytes left in the file")
    r.pos += count * size
    return ("array", etype, count, start)


def _check_kv(r: _Reader, n_kv: int) -> tuple[dict[str, object], dict[str, int]]:
    """Walk the key/values; returns the values (arrays summarized) and where each key starts."""
    values: dict[str, object] = {}
    offsets: dict[str, int] = {}
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
    return values, offsets


def _check_vocab_arrays(values: dict[str, object]) -> None:
    """Per-token arrays shorter than the vocabulary would be indexed past their end (llama.cpp checks this
    too, with a less specific message)."""
    tokens = values.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, tuple):
        return
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        other = values.get(key)
        if isinstance(other, tuple) and other[2] < tokens[2]:
            raise _Bad(other[3], f"array '{key}' has {other[2]} entries but tokenizer.ggml.tokens has {tokens[2]}")


def _check_hparams(values: dict[str, object], offsets: dict[str, int]) -> None:
    """The hyperparameters llama.cpp checks with GGML_ASSERT (aborting the process) instead of failing the
    load (llama-model.cpp, load_hparams), or that fail an assertion at the first decode. Found by
    tests/test_gguf_fuzz.py; arrays (per-layer values) are left to llama.cpp."""
    arch = values.get("general.architecture")
    if not isinstance(arch, bytes):
        return
    prefix = arch.decode("utf-8", errors="replace") + "."

    def get(name: str, default: int = 0) -> int | float:
        value = values.get(prefix + name, default)
        return default if isinstance(value, (tuple, bytes)) else value

    def bad(name: str, message: str) -> _Bad:
        return _Bad(offsets.get(prefix + name, 0), f"key '{prefix}{name}' {message}")

    n_layer = get("block_count", 1)
    if not 1 <= n_layer <= MAX_LAYERS:
        raise bad("block_count", f"is {n_layer}; llama.cpp takes 1 to {MAX_LAYERS} layers")
    if get("nextn_predict_layers") > n_layer:
        raise bad("nextn_predict_layers", f"is {get('nextn_predict_layers')}, more than block_count {n_layer}")
    n_expert, n_used = get("expert_count"), get("expert_used_count")
    n_groups, n_group_used = get("expert_group_count"), get("expert_group_used_count")
    if n_expert > MAX_EXPERTS:
        raise bad("expert_count", f"is {n_expert}; llama.cpp takes at most {MAX_EXPERTS} experts")
    per_layer_used = isinstance(values.get(prefix + "expert_used_count"), tuple)  # an array: left to llama.cpp
    if not per_layer_used and (n_used > n_expert or (n_expert > 0 and n_used == 0)):
        raise bad("expert_used_count", f"is {n_used} with expert_count {n_expert} (must be 1 to expert_count, or "
                                       "0 without experts)")
    if n_expert > 0 and (n_groups >= n_expert or (n_groups > 1 and (n_expert % n_groups
                                                                     or not 0 < n_group_used < n_groups))):
        raise bad("expert_group_count", f"is {n_groups} with {n_expert} experts and expert_group_used_count "
                                        f"{n_group_used} (groups must divide the experts, more than are used)")
    if n_expert == 0 and n_groups:
        raise bad("expert_group_count", f"is {n_groups} in a model without experts")
    scaling = values.get(prefix + "rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", f"is {scaling!r}; llama.cpp knows {sorted(t.decode() for t in ROPE_SCALING_TYPES)}")
    for name in ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon"):
        eps = get(name, 0.0)
        if not (isinstance(eps, (int, float)) and 0.0 <= eps < float("inf")):
            raise bad(name, f"is {eps}; a norm epsilon must be a finite number >= 0 (ggml asserts it)")


def _check_tensors(r: _Reader, n_tensors: int, alignment: int) -> list[tuple[str, int, int]]:
    """Read the tensor table; returns (name, offset, n_bytes) per tensor, in file order."""
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
        shape = []
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
        offset_at = r.pos
        offset = r.u64(f"the data offset of tensor '{name}'")
        if offset % alignment:
            raise _Bad(offset_at, f"tensor '{name}' has data offset {offset}, not a multiple of the alignment "
                                  f"{alignment}")
        tensors.append((name, offset, n_elements // block * type_size))
    return tensors


def _check_data(r: _Reader, tensors: list[tuple[str, int, int]], alignment: int) -> tuple[int, int]:
    """Check where the tensor data lies; returns (data section offset, its size)."""
    if not tensors:
        return r.pos, 0
    data_offset = -(-r.pos // alignment) * alignment  # the data section starts at the next aligned byte
    room = r.size - data_offset
    if room < 0:
        raise _Bad(r.pos, f"the data section would start at byte {data_offset}, past the end of the file "
                          f"({r.size} bytes)")
    for name, offset, n_bytes in tensors:
        if offset + n_bytes > room:
            raise _Bad(data_offset + min(offset, room),
                       f"the data of tensor '{name}' (bytes {data_offset + offset} to {data_offset + offset + n_bytes}) "
                       f"lies beyond the end of the file ({r.size} bytes)")
    by_offset = sorted(tensors, key=lambda t: t[1])
    for (prev, prev_offset, prev_bytes), (name, offset, _) in itertools.pairwise(by_offset):
        if offset < prev_offset + prev_bytes:
            raise _Bad(data_offset + offset, f"the data of tensor '{name}' overlaps that of '{prev}' (offsets "
                                             f"{offset} and {prev_offset}, {prev_bytes} bytes)")
    # llama.cpp also requires table order with only alignment padding between tensors.
    expected = 0
    for name, offset, n_bytes in tensors:
        if offset != expected:
            raise _Bad(data_offset + offset, f"tensor '{name}' has data offset {offset} but llama.cpp expects "
                                             f"{expected} (tensor data must follow the table's order, padded to "
                                             f"{alignment} bytes)")
        expected += -(-n_bytes // alignment) * alignment
    return data_offset, expected


def _parse(buf, size: int) -> GGUFLayout:
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
    values, offsets = _check_kv(r, n_kv)
    _check_vocab_arrays(values)
    _check_hparams(values, offsets)
    alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise _Bad(24, f"general.alignment is {alignment}, not a power of two")
    tensors = _check_tensors(r, n_tensors, alignment)
    data_offset, data_size = _check_data(r, tensors, alignment)
    return GGUFLayout(version=version, n_kv=n_kv, n_tensors=n_tensors, alignment=alignment,
                      data_offset=data_offset, data_size=data_size)


def validate(path: str | Path) -> GGUFLayout:
    """Check the metadata part of a GGUF file; raise ModelLoadError naming what is wrong and where.

    Results are cached per file, keyed by its size and modification time (loads re-validate nothing)."""
    path = Path(path)
    stat = path.stat()
    return _validate(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _validate(path: str, size: int, mtime_ns: int) -> GGUFLayout:  # mtime_ns only keys the cache
    with open(path, "rb") as f:
        if size == 0:
            raise ModelLoadError(f"{path} is empty; {FIX}")
        # A mapping, not a read: only the pages of the header and tables are ever touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(buf, min(size, len(buf)))
            except _Bad as bad:
                raise ModelLoadError(f"{Path(path).name} is not a valid GGUF file: {bad} (at byte {bad.offset}); "
                                     f"{FIX}") from None
