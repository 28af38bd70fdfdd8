"""Memory: what a model and its context need on each device before loading (`estimate`), and a placement that
fits a memory budget (`fit`).

Both stand on llama.cpp's own accounting: an estimate is a no_alloc dry-run load plus a context created on it,
whose per-buffer-type breakdown (weights, KV cache, compute buffers) is read through the shim, so it is what a
real load allocates. `fit` runs llama.cpp's fit (common_fit_params, through the shim) with these differences:

- a budget per device below its real free memory (plan for a 12 GiB card on an 80 GB one; simulate on CI);
- the caller's placement rules are kept: they come first (first match wins) and the fit places the rest;
- every plan is checked by an estimate of exactly what will be loaded, and refitted with a larger margin
  when llama.cpp's fit overshoots a budget (it can: DESIGN §8), so success means "measured to fit";
- nothing the caller passed is modified, whether the fit succeeds or not.

(DESIGN §1 names this module fit.py; it is memory.py so that `llmplace.fit` stays the function.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from . import logs
from ._ffi import C, c_string, ffi
from .context import _FLASH_ATTN, KV_TYPES
from .errors import DeviceNotFoundError, InvalidParameterError, OutOfMemoryError
from .gguf_info import read as read_gguf
from .placement import Placement, Rule, is_host_buffer, model_devices
from .runtime_cost import ProbeSettings, RuntimeCost, device_by_name, device_free, runtime_costs

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


def _human(n: float) -> str:
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
            free = "" if m.free is None else _human(m.free)
            mapped = _human(m.mapped) if m.mapped else ""
            lines.append(f"{m.memory:<26} {_human(m.weights):>11} {mapped:>11} {_human(m.kv):>11} "
                         f"{_human(m.compute):>11} {_human(m.runtime):>11} {_human(m.total):>11} {free:>11}")
        if any(m.mapped for m in self.memories.values()):
            lines.append("(mmap): the part of the weights read from the memory-mapped model file (page cache)")
        if any(m.runtime for m in self.memories.values()):
            lines.append("runtime: what the process holds beyond llama.cpp's buffers (backend context, workspaces, "
                         "pools, graphs), measured once per device and model")
        return "\n".join(lines)


def context_params(n_ctx: int, *, n_seq: int = 1, n_batch: int = 2048, n_ubatch: int = 512, type_k: str = "f16",
                   type_v: str = "f16", flash_attn="auto"):
    """llama_context_params as `Context` would make them (the fields that change memory use)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
        raise InvalidParameterError(f"n_ctx must be an int >= 0 (0 = as large as fits / the trained length), not {n_ctx!r}")
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value not in KV_TYPES:
            raise InvalidParameterError(f"{name} must be one of {sorted(KV_TYPES)}, not {value!r}")
    if flash_attn not in _FLASH_ATTN:
        raise InvalidParameterError(f"flash_attn must be 'auto', True or False, not {flash_attn!r}")
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= 256:
        raise InvalidParameterError(f"n_seq must be an int between 1 and 256, not {n_seq!r}")
    params = C.llama_context_default_params()
    params.n_ctx, params.n_seq_max = n_ctx, n_seq
    params.n_batch, params.n_ubatch = n_batch, min(n_ubatch, n_batch)
    params.type_k, params.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
    params.flash_attn_type = _FLASH_ATTN[flash_attn]
    return params


def _device_names() -> dict[str, tuple[str, int, int]]:
    """Default buffer type name → (device name, free bytes, total bytes), for every non-CPU device."""
    result = {}
    for i in range(C.ggml_backend_dev_count()):
        dev = C.ggml_backend_dev_get(i)
        if C.ggml_backend_dev_type(dev) == C.GGML_BACKEND_DEVICE_TYPE_CPU:
            continue
        buft = C.ggml_backend_dev_buffer_type(dev)
        name = c_string(C.ggml_backend_dev_name(dev))
        result[c_string(C.ggml_backend_buft_name(buft)) if buft != ffi.NULL else name] = (name, *device_free(dev))
    return result


def _mmap_buffer_types() -> frozenset[str]:
    """Buffer types whose weights a load with use_mmap maps from the file instead of copying them: the CPU's
    default one, and the GPUs' pinned host ones (with mmap llama.cpp puts those weights on the CPU's default
    buffer type, llama-model-loader.cpp). A dry run maps nothing, so this names what a real load would map."""
    names = set()
    for i in range(C.ggml_backend_dev_count()):
        dev = C.ggml_backend_dev_get(i)
        if C.ggml_backend_dev_type(dev) == C.GGML_BACKEND_DEVICE_TYPE_CPU:
            buft = C.ggml_backend_dev_buffer_type(dev)
        else:
            buft = C.ggml_backend_dev_host_buffer_type(dev)
        if buft != ffi.NULL:
            names.add(c_string(C.ggml_backend_buft_name(buft)))
    return frozenset(names)


def _tensor_bytes(model_ptr) -> dict[str, int]:
    """Bytes of the model's weight tensors per buffer type name."""
    totals: dict[str, int] = {}
    name, buft, n_bytes = ffi.new("const char **"), ffi.new("const char **"), ffi.new("uint64_t *")
    for i in range(C.llmplace_model_tensor_count(model_ptr)):
        if C.llmplace_model_tensor_info(model_ptr, i, name, buft, n_bytes):
            key = ffi.string(buft[0]).decode()
            totals[key] = totals.get(key, 0) + int(n_bytes[0])
    return totals


def measure(model, cparams, *, use_mmap: bool = True) -> dict[str, MemoryUse]:
    """Create a context for `model` (a dry-run or loaded Model) and read llama.cpp's memory breakdown of both.
    On a dry-run model nothing is allocated, and the numbers are what a real load would allocate (a load
    with `use_mmap` maps the host weights it can: they are reported as mapped)."""
    with logs.capture() as messages:
        ctx = C.llama_init_from_model(model._ptr, cparams)
    if ctx == ffi.NULL:
        reason = "; ".join(m for m in messages if m) or "no reason given"
        raise OutOfMemoryError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens for "
                               f"{model.path.name}: {reason}")
    try:
        return breakdown(ctx, would_map=_mmap_buffer_types() if model.dry_run and use_mmap else ())
    finally:
        C.llama_free(ctx)


def breakdown(ctx, *, would_map: Sequence[str] = ()) -> dict[str, MemoryUse]:
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


def _model_path(model) -> Path:
    path = getattr(model, "path", model)
    return Path(os.fspath(path)).expanduser()


def estimate(model, placement=None, *, n_ctx: int = 4096, n_seq: int = 1, type_k: str = "f16", type_v: str = "f16",
             flash_attn="auto", n_batch: int = 2048, n_ubatch: int = 512, draft=None, draft_placement=None,
             n_gpu_layers: int = -1, use_mmap: bool = True, runtime=None, **split) -> Estimate:
    """Bytes of weights, KV cache and compute buffers per device (and host) for `model` (a path or a Model)
    under `placement` with a context of n_ctx tokens, from a dry run: nothing is read or allocated; plus each
    device's runtime row (what the process holds there beyond those buffers, runtime_cost.py).
    draft: a draft model (path or Model) whose needs are added, with a context of the same size.
    use_mmap: as the load will be (load's default: True); host weights it maps are reported as `mapped`.
    runtime: None = measured once per device and model (cached; the CPU and RPC devices have rules, no
    measurement); bytes or a size string for every measured device (GPUs); or {"CUDA0": "700MiB", ...}; 0
    leaves the row out.
    split takes load()'s split keywords (split_mode, tensor_split, main_gpu, devices)."""
    from .model import Model

    cparams = context_params(n_ctx, n_seq=n_seq, n_batch=n_batch, n_ubatch=n_ubatch, type_k=type_k, type_v=type_v,
                             flash_attn=flash_attn)
    with Model(_model_path(model), n_gpu_layers=n_gpu_layers, placement=placement, dry_run=True, progress=False,
               **split) as dry:
        memories = measure(dry, cparams, use_mmap=use_mmap)
        chosen_ctx = C.llama_n_ctx_train(dry._ptr) if n_ctx == 0 else n_ctx
    if draft is not None:
        cparams.n_ctx = chosen_ctx
        with Model(_model_path(draft), n_gpu_layers=n_gpu_layers, placement=draft_placement, dry_run=True,
                   progress=False) as dry:
            for name, use in measure(dry, cparams, use_mmap=use_mmap).items():
                mine = memories.get(name, MemoryUse(name, 0, 0, 0, free=use.free))
                memories[name] = replace(mine, weights=mine.weights + use.weights, kv=mine.kv + use.kv,
                                         compute=mine.compute + use.compute, mapped=mine.mapped + use.mapped)
    settings = ProbeSettings(n_batch=n_batch, n_ubatch=n_ubatch, n_seq=n_seq, type_k=type_k, type_v=type_v,
                             flash_attn=flash_attn)
    devs = [device_by_name(name) for name in memories if name != HOST]
    for name, cost in runtime_of(model, devs, settings, runtime, draft).items():
        memories[name] = replace(memories[name], runtime=cost.total)
    return Estimate(memories, chosen_ctx)


def runtime_of(model, devs: Sequence, settings: ProbeSettings, given=None, draft=None) -> dict[str, RuntimeCost]:
    """The runtime row per device name of `devs` (ggml device handles; runtime_cost.py). A draft model runs in a
    context of its own, with its own pools and library workspaces on each device (the backend's context is
    shared): its cost less that part is added."""
    costs = runtime_costs(_model_path(model), devs, settings, given)
    if draft is not None:
        for name, cost in runtime_costs(_model_path(draft), devs, settings, given).items():
            if cost.source != "given":
                costs[name] = replace(costs[name], total=costs[name].total + cost.total - cost.context)
    return costs


# ---- fit -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    """A placement that fits (or the closest llama.cpp found, with success False and the reason)."""

    success: bool
    n_ctx: int
    n_gpu_layers: int
    tensor_split: list[float] | None     # per offload device, llama.cpp's order; None = llama.cpp's default
    placement: Placement                 # the caller's rules first, then the fit's overrides
    estimate: Estimate                   # measured for exactly this plan
    message: str                         # what was given up, or why it does not fit
    budgets: dict[str, int] = field(default_factory=dict)   # usable bytes per device (budget or free, minus margin)

    def load_kwargs(self) -> dict:
        """Keywords for llmplace.load (n_gpu_layers, placement, tensor_split)."""
        kwargs = dict(n_gpu_layers=self.n_gpu_layers, placement=self.placement)
        if self.tensor_split is not None:
            # llama.cpp's fit computed these as shares of the layer count: keep its reading
            kwargs.update(tensor_split=self.tensor_split, split_by="layers")
        return kwargs

    def to_ot(self) -> str:
        """The overrides as llama.cpp's -ot string (pattern rules only)."""
        return ",".join(f"{r.pattern}={r.to}" for r in self.placement.rules if r.pattern is not None)

    def to_python(self) -> str:
        rules = ",\n    ".join(f"Rule({r.to!r}, pattern={r.pattern!r})" for r in self.placement.rules)
        split = f", tensor_split={self.tensor_split!r}, split_by='layers'" if self.tensor_split is not None else ""
        return (f"placement = Placement([\n    {rules}\n])\n" if rules else "placement = Placement([])\n") + \
            f"model = llmplace.load(path, n_gpu_layers={self.n_gpu_layers}, placement=placement{split})\n" + \
            f"context = llmplace.Context(model, n_ctx={self.n_ctx})"

    def __str__(self) -> str:
        head = "fits" if self.success else "does NOT fit"
        return f"{head}: {self.message}\n{self.estimate}"


def _resolve_budget(budget: Mapping[str, int | str] | None, devs: list) -> dict[int | str, int]:
    """{index into the offload devices (or "host"): bytes}. Keys: device names ("CUDA0", case-insensitive),
    "gpu", "gpuN" / "gpu:N" (the N-th offload device), "host" / "cpu" (RAM)."""
    names = [c_string(C.ggml_backend_dev_name(d)) for d in devs]
    result: dict[int | str, int] = {}
    if budget is not None and not isinstance(budget, Mapping):
        raise InvalidParameterError(f"budget must be a mapping such as {{'CUDA0': '12GiB'}}, not {budget!r}")
    for key, value in (budget or {}).items():
        k = str(key).strip().lower()
        if k in (HOST, "cpu"):
            result[HOST] = parse_size(value, f"budget[{key!r}]")
            continue
        index = next((i for i, n in enumerate(names) if n.lower() == k), None)
        if index is None:
            m = re.fullmatch(r"gpu:?(\d*)", k)
            if m and int(m.group(1) or 0) < len(names):
                index = int(m.group(1) or 0)
        if index is None:
            raise DeviceNotFoundError(f"budget names {key!r}, which is not an offload device here; devices: "
                                      f"{', '.join(names) or 'none (no GPU backend)'} (or 'gpu0', 'gpu1' ...)")
        result[index] = parse_size(value, f"budget[{key!r}]")
    return result


def _describe_changes(path: Path, fitted: Placement, n_gpu_layers: int, n_layer: int, n_ctx: int,
                      n_ctx_asked: int) -> str:
    parts = []
    if n_ctx_asked and n_ctx < n_ctx_asked:
        parts.append(f"context shrunk from {n_ctx_asked} to {n_ctx} tokens")
    elif not n_ctx_asked:
        parts.append(f"context of {n_ctx} tokens")
    if 0 <= n_gpu_layers < n_layer + 1:
        parts.append(f"{n_gpu_layers} of {n_layer + 1} layers offloaded")
    if fitted.rules:
        moved = fitted.resolve(read_gguf(path).tensors).assignments
        layers = sorted({a.tensor.layer for a in moved if a.tensor.layer is not None})
        to = sorted({a.target for a in moved})
        n_bytes = sum(a.tensor.n_bytes for a in moved)
        span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layer"
        parts.append(f"{len(moved)} tensors ({_human(n_bytes)}) of {span} overridden to {', '.join(to)}")
    return "; ".join(parts) or "everything on the devices as asked"


def fit(model, *, budget: Mapping[str, int | str] | None = None, margin: int | str = "1GiB", n_ctx: int = 0,
        n_ctx_min: int = 4096, draft=None, placement=None, n_seq: int = 1, type_k: str = "f16", type_v: str = "f16",
        flash_attn="auto", n_batch: int = 2048, n_ubatch: int = 512, devices: Sequence[str] | None = None,
        attempts: int = 3, use_mmap: bool = True, runtime=None, dense: str = "auto") -> FitResult:
    """Find n_gpu_layers, tensor_split, overrides and (if n_ctx=0) the context size that fit each device.

    budget: {"CUDA0": "12GiB", "host": "32GiB", ...}: the most this process may use of each memory, as
    nvidia-smi would show it: llama.cpp's buffers and the device's runtime row (its backend's context,
    workspaces, pools and graphs; see runtime_cost.py). Default: what the device has free.
    margin: left unused on each device. n_ctx: 0 = as large as fits, down to n_ctx_min; N = exactly N.
    n_batch / n_ubatch / n_seq / type_k / type_v / flash_attn: the context's settings (they size the KV cache
    and compute buffers; use the same when creating the Context).
    placement: your rules, kept as they are; the fit places what they leave. draft: a draft model to co-fit.
    use_mmap: whether the model will be loaded with mmap (load's default): only says which host weights
    the estimate reports as mapped. runtime: as for `estimate` (None = measured once per device and model).
    dense: for a dense model that does not fit whole on one device, "layers" moves whole layers to host memory
    (llama.cpp's way); "hot" keeps attention, norms and the KV cache of every layer on the device and moves
    the FFN weights of the first layers instead; "auto" (default) picks by modelled decode speed
    (`_hot_tensors_first`).
    Never raises for "does not fit": the result says success=False and why.
    """
    if dense not in ("auto", "layers", "hot"):
        raise InvalidParameterError(f"dense must be 'auto', 'layers' or 'hot', not {dense!r}")
    from .backends import ensure_initialized

    ensure_initialized()
    path = _model_path(model)
    info = read_gguf(path)
    n_ctx_train = int(info.metadata.get(f"{info.arch}.context_length", 0) or 0)
    n_layer = int(info.metadata.get(f"{info.arch}.block_count", 0) or 0)
    if isinstance(n_ctx_min, bool) or not isinstance(n_ctx_min, int) or n_ctx_min < 1:
        raise InvalidParameterError(f"n_ctx_min must be an int >= 1, not {n_ctx_min!r}")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
        raise InvalidParameterError(f"n_ctx must be an int >= 0 (0 = as large as fits), not {n_ctx!r}")
    if n_ctx == 0 and n_ctx_train and n_ctx_min > n_ctx_train:
        raise InvalidParameterError(f"n_ctx_min={n_ctx_min} is larger than the {n_ctx_train} tokens "
                                    f"{path.name} was trained for; lower it")
    user = Placement.parse(placement)
    margin_bytes = parse_size(margin, "margin")
    devs = model_devices(devices)
    budgets = _resolve_budget(budget, devs)
    names = [c_string(C.ggml_backend_dev_name(d)) for d in devs]
    free = [device_free(dev)[0] for dev in devs]  # read after this process initialised each device
    settings = ProbeSettings(n_batch=n_batch, n_ubatch=n_ubatch, n_seq=n_seq, type_k=type_k, type_v=type_v,
                             flash_attn=flash_attn)
    costs = runtime_of(path, devs, settings, runtime, draft)
    # usable: the most the process may hold in each memory (budget, or what it could reach: the free memory
    # plus the backend context it already holds), less the margin. room: what is left of that for llama.cpp's
    # buffers once the runtime row is paid.
    usable, room = {}, {}
    for i, name in enumerate(names):
        reachable = free[i] + costs[name].context
        usable[name] = max(0, min(reachable, budgets.get(i, reachable)) - margin_bytes)
        room[name] = max(0, usable[name] - costs[name].total)
    if HOST in budgets:  # llama.cpp's fit takes host memory as unlimited: only checked on the measured plan
        usable[HOST] = budgets[HOST]
    runtime_given = {name: cost.total for name, cost in costs.items()}  # measured once, not again per attempt
    split_kwargs = {} if devices is None else {"devices": list(devices)}

    extra_margin = [0] * len(devs)
    n_ctx_try = n_ctx  # a context the fit shrinks itself sets a fixed size here (see below)
    result = None
    refits = shrinks = 0
    while True:
        mparams = C.llama_model_default_params()
        if devices is not None:
            # NULL-terminated; this local keeps the array alive while llama.cpp's fit reads it
            device_array = ffi.new("ggml_backend_dev_t[]", len(devs) + 1)
            for i, d in enumerate(devs):
                device_array[i] = d
            mparams.devices = device_array
        cparams = context_params(n_ctx_try, n_seq=n_seq, n_batch=n_batch, n_ubatch=n_ubatch, type_k=type_k,
                                 type_v=type_v, flash_attn=flash_attn)
        tensor_split = ffi.new("float[]", C.llama_max_devices())
        overrides = ffi.new("struct llama_model_tensor_buft_override[]", C.llama_max_tensor_buft_overrides())
        margins = ffi.new("size_t[]", max(1, len(devs)))
        for i in range(len(devs)):
            margins[i] = max(0, free[i] - room[names[i]]) + extra_margin[i]
        draft_args = (ffi.NULL, ffi.NULL, ffi.NULL)
        if draft is not None:
            draft_args = (str(_model_path(draft)).encode(), ffi.new("struct llama_model_params *",
                                                                    C.llama_model_default_params()),
                          ffi.new("struct llama_context_params *", cparams))
        m_ptr = ffi.new("struct llama_model_params *", mparams)
        c_ptr = ffi.new("struct llama_context_params *", cparams)
        err = ffi.new("char[]", 512)
        with logs.capture():
            status = C.llmplace_fit_params(str(path).encode(), m_ptr, c_ptr, tensor_split, overrides, margins,
                                           n_ctx_min, *draft_args, C.GGML_LOG_LEVEL_ERROR, err, len(err))
        if status == 2:
            raise InvalidParameterError(f"llama.cpp's fit refused {path.name}: {ffi.string(err).decode()}")
        fitted_rules = []
        for i in range(C.llama_max_tensor_buft_overrides()):
            if overrides[i].pattern == ffi.NULL:
                break
            fitted_rules.append(Rule(c_string(C.ggml_backend_buft_name(overrides[i].buft)),
                                     pattern=ffi.string(overrides[i].pattern).decode()))
        # llama.cpp's fit also writes a pattern for the output layer's index (blk.<n_layer>), which names no
        # tensor: keep only rules that select something, so loading the plan warns about nothing.
        fitted = Placement(fitted_rules)
        unused = set(fitted.resolve(info.tensors).unmatched) if fitted_rules else set()
        fitted = Placement([r for i, r in enumerate(fitted_rules) if i not in unused])
        combined = user + fitted
        ngl = int(m_ptr.n_gpu_layers)
        chosen_ctx = int(c_ptr.n_ctx) or (n_ctx_try or n_ctx_train)
        split = [float(tensor_split[i]) for i in range(len(devs))] if len(devs) > 1 else None
        if split is not None and sum(split) <= 0:
            split = None
        kw = dict(split_kwargs)
        if split is not None:
            kw.update(tensor_split=split, split_by="layers")  # llama.cpp's shares of the layer count
        def measure_plan(rules: Placement, layers: int = ngl) -> tuple[Estimate, dict[str, int]]:
            planned = estimate(path, rules, n_ctx=chosen_ctx, n_seq=n_seq, type_k=type_k, type_v=type_v,
                               flash_attn=flash_attn, n_batch=n_batch, n_ubatch=n_ubatch, draft=draft,
                               n_gpu_layers=layers, use_mmap=use_mmap, runtime=runtime_given, **kw)
            return planned, {name: planned[name].total - usable[name] for name in usable
                             if name in planned.memories and planned[name].total > usable[name]}

        measured, over = measure_plan(combined)
        if status == 0:
            for front in _experts_from_the_front(fitted, info, n_layer):
                front_measured, front_over = measure_plan(user + front)
                if not front_over:
                    fitted, combined, measured, over = front, user + front, front_measured, front_over
                    break
        hot_note = ""
        if status == 0 and not over and dense != "layers" and not user.rules and len(devs) == 1 \
                and 0 <= ngl <= n_layer:
            hot = _hot_tensors_first(info, n_layer, devs[0], measured, lambda rules: measure_plan(rules, -1),
                                     force=dense == "hot")
            if hot is not None:
                fitted, measured, hot_note = hot
                combined, over, ngl = user + fitted, {}, -1
        memories = {k: replace(v, budget=usable.get(k)) for k, v in measured.memories.items()}
        measured = Estimate(memories, measured.n_ctx)
        changes = _describe_changes(path, fitted, ngl, n_layer, chosen_ctx, n_ctx) + hot_note
        if status == 0 and not over:
            return FitResult(True, chosen_ctx, ngl, split, combined, measured, changes, usable)
        if status == 0 and set(over) == {HOST}:
            reason = (f"host memory would hold {_human(measured[HOST].total)}, over its budget of "
                      f"{_human(usable[HOST])} with the devices as full as their budgets allow: this model and context need more memory "
                      "than the budget gives (lower n_ctx, use a smaller quantization or raise the budget)")
            result = FitResult(False, chosen_ctx, ngl, split, combined, measured, f"{reason} ({changes})", usable)
        elif status == 0:
            reason = "; ".join(f"{name} would hold {_human(usable[name] + b)}, {_human(b)} over its "
                               f"{_human(usable[name])}" for name, b in over.items())
            result = FitResult(False, chosen_ctx, ngl, split, combined, measured, f"{reason} ({changes})", usable)
        else:
            reason = "llama.cpp's fit found no placement within the budget even with everything it may move " \
                     "moved to host memory" + (f" and the context at {n_ctx_min} tokens" if n_ctx == 0 else "")
            return FitResult(False, n_ctx, ngl, split, combined, measured, f"{reason} ({changes})", usable)
        # With n_ctx=0 the context may shrink (down to n_ctx_min) wherever the KV cache is what overflows,
        # host included: llama.cpp's fit only shrinks it for the devices it knows budgets of.
        smaller = _shrunk_context(over, measured, chosen_ctx, n_ctx_min) if n_ctx == 0 else None
        if smaller is not None and shrinks < 8:
            n_ctx_try, shrinks = smaller, shrinks + 1
            continue
        if set(over) == {HOST} or refits + 1 >= max(1, attempts):
            return result
        refits += 1
        for i, name in enumerate(names):  # llama.cpp's plan overshot: refit with the overshoot as extra margin
            extra_margin[i] += over.get(name, 0) + (16 << 20 if name in over else 0)


def _experts_from_the_front(fitted: Placement, info, n_layer: int) -> list[Placement]:
    """llama.cpp's fit moves MoE experts to host memory from the last layer backwards. The same number of layers
    taken from the front (llama.cpp's --n-cpu-moe) decoded faster under the same cap on the H200 (Qwen3-30B-A3B
    shape at 12 GiB, 4 paired runs: 79-89 against 47-84 tok/s, README). When the fit moved only experts (and
    the boundary layer's router) of the last k layers, return n_cpu_moe(k) and n_cpu_moe(k + 1) to try first;
    otherwise nothing."""
    from .placement import n_cpu_moe, role_of

    if not fitted.rules:
        return []
    moved = fitted.resolve(info.tensors).assignments
    roles = [role_of(a.tensor.name) for a in moved]
    if not moved or any(r not in ("experts", "router") for r in roles) or any(a.tensor.layer is None for a in moved):
        return []
    if any(not is_host_buffer(a.target) for a in moved):
        return []
    layers = sorted({a.tensor.layer for a, r in zip(moved, roles) if r == "experts"})
    if not layers or layers != list(range(layers[0], n_layer)):
        return []
    k = len(layers)
    return [n_cpu_moe(n) for n in (k, k + 1) if n <= n_layer]


# What one switch between host and device in a token's graph costs, as bytes of host memory read: each switch is
# a synchronisation and a copy of the activations. On the H200 (host reads ~83 GB/s), the F16 Llama-8B shape at
# 4 GiB decoded at the same speed (1.01x) with hot tensors first, which had 62 more switches and 165 MiB less on
# the host (61 MiB of weights, 104 MiB of KV cache): break-even at about 2.7 MiB a switch, counted as 3 MiB.
SWITCH_BYTES = 3 << 20


def _hot_tensors_first(info, n_layer: int, dev, layers_plan: Estimate, measure, *, force: bool = False):
    """For a dense model that does not fit whole on `dev`: keep attention, norms and the KV cache of every layer
    on the device and move the FFN weights (the bulk of a layer) of the first m layers to host memory, m as
    small as fits. Returns (placement, estimate, note) when that is modelled faster than whole layers on the
    host (`layers_plan`), or always when `force` and it fits; otherwise None.

    The model: decoding a token reads every host-resident weight and the host-resident KV cache from host
    memory (bandwidth-bound, as measured: README, "70B on 4 GiB"), plus SWITCH_BYTES per switch between host
    and device. Whole layers have the KV cache of their layers on the host and one switch each way; hot tensors
    first has none of the KV cache there but two switches per moved FFN."""
    from .placement import role_of

    if any(role_of(t.name) == "experts" for t in info.tensors):
        return None
    ffn: dict[int, int] = {}
    for t in info.tensors:
        if t.layer is not None and role_of(t.name) == "ffn":
            ffn[t.layer] = ffn.get(t.layer, 0) + t.n_bytes
    if not ffn:
        return None
    name = c_string(C.ggml_backend_dev_name(dev))
    host_buft = C.ggml_backend_dev_host_buffer_type(dev)
    target = c_string(C.ggml_backend_buft_name(host_buft)) if host_buft != ffi.NULL else "cpu"
    _, over = measure(Placement([]))  # every layer on the device
    if set(over) != {name}:
        return None
    m, moved = 0, 0
    while m < n_layer and moved < over[name]:
        moved, m = moved + ffn.get(m, 0), m + 1

    def plan(count: int):
        rules = Placement([Rule(target, role="ffn", layers=range(0, count))])
        planned, planned_over = measure(rules)
        return (rules, planned) if not planned_over else None

    # the FFN bytes of m layers would free the excess, but moving weights to the host grows the compute buffer
    # (op offload copies them back for prompts): find the fewest layers that fit, by bisection up to all of them
    best = plan(n_layer)
    if best is None:
        return None
    low, high = max(1, m), n_layer  # high fits
    while low < high:
        middle = (low + high) // 2
        found = plan(middle)
        if found is not None:
            best, high = found, middle
        else:
            low = middle + 1
    rules, planned = best
    count = high
    cost_layers = layers_plan[HOST].weights + layers_plan[HOST].kv + 2 * SWITCH_BYTES
    cost_hot = planned[HOST].weights + planned[HOST].kv + 2 * count * SWITCH_BYTES
    if cost_hot >= cost_layers and not force:
        return None
    note = (f"; hot tensors first: attention, norms and KV of every layer on {name}, the FFN weights of layers "
            f"0-{count - 1} in host memory (modelled host reads per token {_human(cost_hot)} against "
            f"{_human(cost_layers)} for whole layers)")
    return rules, planned, note


def _shrunk_context(over: Mapping[str, int], measured: Estimate, n_ctx: int, n_ctx_min: int) -> int | None:
    """A context size whose KV cache is smaller by what each memory is over (rounded down to 256 tokens, not
    below n_ctx_min), or None when shrinking cannot help."""
    if n_ctx <= n_ctx_min:
        return None
    drop = 0
    for name, excess in over.items():
        per_token = measured[name].kv / n_ctx
        if per_token <= 0:
            return None  # this memory holds no KV cache: a smaller context does not relieve it
        drop = max(drop, -(-excess // int(max(1, per_token))))
    smaller = max(n_ctx_min, (n_ctx - drop) // 256 * 256)
    return smaller if smaller < n_ctx else None
