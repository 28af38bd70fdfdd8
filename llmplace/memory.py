"""Memory: the bytes a model and its context take in each memory (a device, or the host's RAM), as llama.cpp
accounts for them.

Everything here stands on llama.cpp's own accounting: a context is created on a model (loaded, or a no_alloc
dry run that allocates nothing) and its per-buffer-type breakdown (weights, KV cache, compute buffers) is read
through the shim, so it is what a real load allocates. The dry runs themselves, `estimate` and `fit`, are in
planning.py, above the model they build: this module takes a model and reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

from ._ffi import C, CData, c_string, ffi
from .backends import device_memory
from .backends import native_devices
from .c_values import FLASH_ATTN_TYPES
from .context import KV_TYPES, MAX_N_CTX
from .errors import InvalidParameterError, OutOfMemoryError
from .native_errors import native_call
from .placement import is_host_buffer

if TYPE_CHECKING:
    from .model import Model

# planning and runtime_cost read a device's (free, total) bytes here
device_free = device_memory

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
HOST = "host"


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from an int or a string such as "12GiB", "512 MiB", "1.5GB" (KiB/MiB/GiB/TiB are powers of 1024,
    KB/MB/GB/TB of 1000)."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"{what} must be a number of bytes or a string like '12GiB', not {value!r}")
    if isinstance(value, (int, float)):
        if not value >= 0 or value == float("inf"):
            raise InvalidParameterError(f"{what} must be >= 0 bytes, got {value!r}")
        return int(value)
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise InvalidParameterError(f"cannot read {what} {value!r}: write a number and a unit, e.g. '12GiB', "
                                    "'512MiB' or '1.5GB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_size(n: float) -> str:
    """Bytes for people: "512 B", "1.50 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# ---- estimate ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryUse:
    """What one memory (a device, or the host's RAM) holds for a model and its context."""

    memory: str          # "host", or the device's name ("CUDA0", "RPC0[127.0.0.1:50052]")
    weights: int         # bytes of model weights, `mapped` included
    kv: int              # bytes of KV cache (and other context state)
    compute: int         # bytes of compute buffers
    free: int | None = None    # the device's free memory when measured (None for the host)
    budget: int | None = None  # the budget it was fitted to, if any
    mapped: int = 0      # of `weights`: bytes of the tensors read through the mmap'd model file (page cache,
    #                      shared with the file) rather than copied into allocated RAM buffers
    runtime: int = 0     # what the process holds there beyond llama.cpp's buffers (a GPU backend's context,
    #                      kernel modules, library workspaces, pools, graphs): measured, see runtime_cost.py

    @property
    def buffers(self) -> int:
        """llama.cpp's own buffers: weights, KV cache and compute."""
        return self.weights + self.kv + self.compute

    @property
    def total(self) -> int:
        """What the process uses in this memory: the buffers and the runtime."""
        return self.buffers + self.runtime


@dataclass(frozen=True)
class Estimate:
    """Bytes per memory for a model + context, from llama.cpp's own dry run."""

    memories: dict[str, MemoryUse]
    n_ctx: int

    def __getitem__(self, memory: str) -> MemoryUse:
        return self.memories[memory]

    def devices(self) -> list[MemoryUse]:
        return [m for name, m in self.memories.items() if name != HOST]

    def __str__(self) -> str:
        head = (f"{'memory':<26} {'weights':>11} {'(mmap)':>11} {'KV cache':>11} {'compute':>11} {'runtime':>11} "
                f"{'total':>11}")
        lines = [f"{head} {'free':>11}"]
        for m in self.memories.values():
            free = "" if m.free is None else human_size(m.free)
            mapped = human_size(m.mapped) if m.mapped else ""
            lines.append(f"{m.memory:<26} {human_size(m.weights):>11} {mapped:>11} {human_size(m.kv):>11} "
                         f"{human_size(m.compute):>11} {human_size(m.runtime):>11} {human_size(m.total):>11} "
                         f"{free:>11}")
        if any(m.mapped for m in self.memories.values()):
            lines.append("(mmap): the part of the weights read from the memory-mapped model file (page cache)")
        if any(m.runtime for m in self.memories.values()):
            lines.append("runtime: what the process holds beyond llama.cpp's buffers (backend context, workspaces, "
                         "pools, graphs), measured once per device and model")
        return "\n".join(lines)


def context_params(n_ctx: int, *, n_seq: int = 1, n_batch: int = 2048, n_ubatch: int = 512, type_k: str = "f16",
                   type_v: str = "f16", flash_attn: bool | str = "auto") -> CData:
    """llama_context_params as `Context` would make them (the fields that change memory use)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= MAX_N_CTX:
        # the bound Context applies: beyond it llama.cpp's dry run spent a minute reserving before failing
        raise InvalidParameterError(f"n_ctx must be an int between 0 and {MAX_N_CTX} (0 = as large as fits / the "
                                    f"trained length), not {n_ctx!r}")
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value not in KV_TYPES:
            raise InvalidParameterError(f"{name} must be one of {sorted(KV_TYPES)}, not {value!r}")
    if flash_attn not in FLASH_ATTN_TYPES:
        raise InvalidParameterError(f"flash_attn must be 'auto', True or False, not {flash_attn!r}")
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= 256:
        raise InvalidParameterError(f"n_seq must be an int between 1 and 256, not {n_seq!r}")
    params = C.llama_context_default_params()
    params.n_ctx, params.n_seq_max = n_ctx, n_seq
    params.n_batch, params.n_ubatch = n_batch, min(n_ubatch, n_batch)
    params.type_k, params.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
    params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
    return params


def _device_names() -> dict[str, tuple[str, int, int]]:
    """Default buffer type name → (device name, free bytes, total bytes), for every non-CPU device."""
    result = {}
    for dev in native_devices():
        if dev.type == C.GGML_BACKEND_DEVICE_TYPE_CPU:
            continue
        buft = dev.buffer_type()
        result[c_string(C.ggml_backend_buft_name(buft)) if buft != ffi.NULL else dev.name] = (dev.name, *dev.memory())
    return result


def _mmap_buffer_types() -> frozenset[str]:
    """Buffer types whose weights a load with use_mmap maps from the file instead of copying them: the CPU's
    default one, and the GPUs' pinned host ones (with mmap llama.cpp puts those weights on the CPU's default
    buffer type, llama-model-loader.cpp). A dry run maps nothing, so this names what a real load would map."""
    names = set()
    for dev in native_devices():
        buft = dev.buffer_type() if dev.type == C.GGML_BACKEND_DEVICE_TYPE_CPU else dev.host_buffer_type()
        if buft != ffi.NULL:
            names.add(c_string(C.ggml_backend_buft_name(buft)))
    return frozenset(names)


def _tensor_bytes(model_ptr: CData) -> dict[str, int]:
    """Bytes of the model's weight tensors per buffer type name."""
    totals: dict[str, int] = {}
    name, buft, n_bytes = ffi.new("const char **"), ffi.new("const char **"), ffi.new("uint64_t *")
    for i in range(C.llmplace_model_tensor_count(model_ptr)):
        if C.llmplace_model_tensor_info(model_ptr, i, name, buft, n_bytes):
            key = ffi.string(buft[0]).decode()
            totals[key] = totals.get(key, 0) + int(n_bytes[0])
    return totals


def measure(model: Model, cparams: CData, *, use_mmap: bool = True) -> dict[str, MemoryUse]:
    """Create a context for `model` (a dry-run or loaded Model) and read llama.cpp's memory breakdown of both.
    On a dry-run model nothing is allocated, and the numbers are what a real load would allocate (a load
    with `use_mmap` maps the host weights it can: they are reported as mapped)."""
    ctx = native_call(C.llama_init_from_model, model._ptr, cparams, error=lambda reason: OutOfMemoryError(
        f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {model.path.name}: {reason}"))
    try:
        return breakdown(ctx, would_map=_mmap_buffer_types() if model.dry_run and use_mmap else ())
    finally:
        C.llama_free(ctx)


def breakdown(ctx: CData, *, would_map: Collection[str] = ()) -> dict[str, MemoryUse]:
    """Bytes per memory of a llama_context (and its model), host buffers of every kind counted as host
    (llama.cpp's own fit drops some of them, e.g. CPU_REPACK).

    Weights in mmap'd buffers ("CPU_Mapped") count as the bytes of the tensors placed there, and as `mapped`:
    llama.cpp reports such a buffer as the whole file range it maps, which also spans the tensors that were
    copied to other devices, so that those bytes would count twice. would_map: buffer types whose weights
    a real load will map (for a dry run, which maps nothing)."""
    n = C.llmplace_memory_breakdown(ctx, 0, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL)
    if n < 0:
        raise OutOfMemoryError("llama.cpp's memory breakdown failed")
    names, model_b = ffi.new("char *[]", max(n, 1)), ffi.new("uint64_t[]", max(n, 1))
    context_b, compute_b, host = ffi.new("uint64_t[]", max(n, 1)), ffi.new("uint64_t[]", max(n, 1)), \
        ffi.new("int32_t[]", max(n, 1))
    n = min(n, C.llmplace_memory_breakdown(ctx, n, names, model_b, context_b, compute_b, host))
    devices = _device_names()
    tensor_bytes = None
    sums: dict[str, list[int]] = {}
    for i in range(n):
        buft = ffi.string(names[i]).decode()
        memory = HOST if host[i] or is_host_buffer(buft) else devices.get(buft, (buft,))[0]
        acc = sums.setdefault(memory, [0, 0, 0, 0])
        weights = int(model_b[i])
        if weights and (buft.endswith("_Mapped") or buft in would_map):
            if tensor_bytes is None:
                tensor_bytes = _tensor_bytes(C.llama_get_model(ctx))
            weights = tensor_bytes.get(buft, 0)
            acc[3] += weights
        acc[0] += weights
        acc[1] += int(context_b[i])
        acc[2] += int(compute_b[i])
    free_of = {name: free for name, free, _ in devices.values()}
    w, k, c, m = sums.pop(HOST, [0, 0, 0, 0])
    result = {HOST: MemoryUse(HOST, w, k, c, mapped=m)}
    for memory, (w, k, c, m) in sums.items():
        result[memory] = MemoryUse(memory, w, k, c, free=free_of.get(memory), mapped=m)
    return result

