"""Planning: where a model's weights and context go before it is loaded, and loading it so.

This is the layer above the model: it builds dry-run Models (no weights read or allocated) and asks llama.cpp
where everything lands and what it would allocate, then loads the model with the plan. Nothing below
(model, memory, placement, runtime_cost, context) imports it.

- `explain`: where every weight tensor would go under a placement, decided by llama.cpp's own dry run.
- `estimate`: bytes of weights, KV cache and compute buffers per device (and host), from a dry run, plus each
  device's runtime row (runtime_cost.py).
- `fit`: a placement that fits a memory budget. It runs llama.cpp's fit (common_fit_params, through the shim)
  with these differences:
  - a budget per device below its real free memory (plan for a 12 GiB card on an 80 GB one; simulate on CI);
  - the caller's placement rules are kept: they come first (first match wins) and the fit places the rest;
  - every plan is checked by an estimate of exactly what will be loaded, and refitted with a larger margin
    when llama.cpp's fit overshoots a budget (it can: DESIGN §8), so success means "measured to fit";
  - nothing the caller passed is modified, whether the fit succeeds or not.
- `load`: Model(path, ...), or with fit=True the fitted plan loaded.

(DESIGN §1 names the estimate/fit module fit.py; no module is named like a public function, so that
`llmplace.fit` and `llmplace.load` stay the functions: see llmplace/__init__.py.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from . import logs
from ._ffi import C, c_string, ffi, null_terminated
from .backends import add_rpc_server, ensure_initialized
from .context import MAX_N_CTX
from .errors import DeviceNotFoundError, InvalidParameterError, ModelLoadError, OutOfMemoryError
from .gguf_info import check_header
from .gguf_info import read as read_gguf
from .images import projector_memory
from .memory import HOST, Estimate, MemoryUse, context_params, device_free, human_size, measure, parse_size
from .model import Model, kv_override_array, rpc_endpoints
from .placement import (Explanation, Placement, Rule, describe, is_host_buffer, model_devices, n_cpu_moe,
                        read_back, role_of)
from .progress import ProgressCallback
from .runtime_cost import ProbeSettings, RuntimeCost, device_by_name, runtime_costs

if TYPE_CHECKING:
    from .gguf_info import GGUFInfo

    ModelPath = str | os.PathLike[str]
    # what Placement.parse reads: a Placement, a Rule, a list of Rules and/or (pattern, target) pairs, or `-ot` text
    PlacementSpec = str | Placement | Rule | Sequence[Rule | tuple[str, str]] | None
    # runtime=: bytes or a size string for every device, or per device name; None: measured
    RuntimeSpec = int | float | str | Mapping[str, int | float | str] | None
    # measure(rules) -> (estimate, {memory: bytes over its budget})
    Measure = Callable[[Placement], tuple[Estimate, dict[str, int]]]


# ---- load ----------------------------------------------------------------------------------------------
def load(path: ModelPath, *, n_gpu_layers: int = -1, split_mode: str = "layer", main_gpu: int = 0,
         use_mmap: bool = True, use_mlock: bool = False, vocab_only: bool = False, check_tensors: bool = False,
         progress: bool | ProgressCallback | None = None, placement: PlacementSpec = None,
         tensor_split: Sequence[float] | None = None, split_by: str = "bytes", devices: Sequence[str] | None = None,
         rpc_servers: str | Sequence[str] | None = None,
         kv_overrides: Mapping[str, bool | int | float | str] | None = None, fit: bool = False,
         budget: Mapping[str, int | str] | None = None, margin: int | str = "1GiB", n_ctx: int = 0,
         n_ctx_min: int = 4096) -> Model:
    """Load a GGUF model.

    n_gpu_layers: layers offloaded to the GPU(s), -1 = all (nothing is offloaded without a GPU backend).
    progress: a callable taking the fraction loaded (return False to cancel; an exception it raises is
    re-raised here), True for a terminal bar, False for none; by default a bar appears on a terminal
    when the load takes longer than a second.
    placement: rules saying which device holds which tensor (a `Placement`, Rules, (pattern, target)
    pairs or an `-ot` string such as "exps=CPU"); tensors no rule matches follow n_gpu_layers.
    split_mode: "layer" (default), "row", "tensor" or "none" (everything on main_gpu).
    tensor_split: relative share of each device ([2, 1] → 2/3 and 1/3), indexed like llama.cpp's device
    list (RPC devices, then GPUs), or like `devices` when given. devices: names of the devices to use.
    split_by: in layer split mode, what tensor_split shares: "bytes" (default: the layer boundaries are chosen
    so each device's weight bytes follow the shares as closely as whole layers allow) or "layers" (llama.cpp's
    own reading: shares of the layer count, the output counted as one more layer, so a device can get
    noticeably more bytes than its share).
    rpc_servers: "host:port" of RPC servers whose devices to add (reachability is checked first).
    kv_overrides: GGUF metadata to read differently, {"qwen3moe.expert_used_count": 4, "llama.context_length":
    8192, "tokenizer.ggml.add_bos_token": False}; the value's type (bool, int, float, str) must match the key's.
    fit: first find the n_gpu_layers / tensor_split / overrides / context size that fit each device's
    `budget` ({"CUDA0": "12GiB", "host": "32GiB"}; default its free memory) less `margin`, keeping
    `placement`'s rules (see llmplace.fit); n_ctx (0 = as large as fits, down to n_ctx_min) becomes the
    default size of this model's contexts; `model.fit_result` says what was chosen. Raises
    OutOfMemoryError, with the estimate, when nothing fits or the real load runs out of memory.
    n_ctx without fit: the default size of this model's contexts (`Context(model)`, `generate`, `Chat`);
    0 (default) = Context's own default, min(4096, the trained length).
    """
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 <= n_ctx <= MAX_N_CTX:
        raise InvalidParameterError(f"n_ctx must be an int from 0 (automatic) to {MAX_N_CTX} tokens, not {n_ctx!r}")
    if fit:
        return _load_fitted(path, budget=budget, margin=margin, n_ctx=n_ctx, n_ctx_min=n_ctx_min, placement=placement,
                            devices=devices, rpc_servers=rpc_servers, progress=progress, use_mmap=use_mmap,
                            use_mlock=use_mlock, check_tensors=check_tensors, split_mode=split_mode,
                            main_gpu=main_gpu, kv_overrides=kv_overrides)
    if budget is not None:
        raise InvalidParameterError("budget= is used by the memory fit: pass fit=True as well")
    model = Model(path, n_gpu_layers=n_gpu_layers, split_mode=split_mode, main_gpu=main_gpu, use_mmap=use_mmap,
                  use_mlock=use_mlock, vocab_only=vocab_only, check_tensors=check_tensors, progress=progress,
                  placement=placement, tensor_split=tensor_split, split_by=split_by, devices=devices,
                  rpc_servers=rpc_servers, kv_overrides=kv_overrides)
    model.default_n_ctx = n_ctx or None
    return model


def _load_fitted(path: ModelPath, *, budget: Mapping[str, int | str] | None, margin: int | str, n_ctx: int,
                 n_ctx_min: int, placement: PlacementSpec, devices: Sequence[str] | None,
                 rpc_servers: str | Sequence[str] | None, progress: bool | ProgressCallback | None, **kwargs: Any
                 ) -> Model:
    for endpoint in rpc_endpoints(rpc_servers):
        add_rpc_server(endpoint)
    check_header(Path(os.fspath(path)).expanduser())
    if kwargs.get("kv_overrides"):
        # bad overrides are refused as such, not reported as a failed fit
        kv_override_array(kwargs["kv_overrides"], read_gguf(path).metadata)
    result = fit(path, budget=budget, margin=margin, n_ctx=n_ctx, n_ctx_min=n_ctx_min, placement=placement,
                 devices=devices)
    if not result.success:
        raise OutOfMemoryError(f"{Path(path).name} does not fit: {result.message}\n{result.estimate}")
    try:
        model = Model(path, devices=devices, progress=progress, **kwargs, **result.load_kwargs())
    except ModelLoadError as exc:
        raise OutOfMemoryError(f"loading {Path(path).name} with the fitted placement failed ({exc}); the fit "
                               f"estimated:\n{result.estimate}\nlower the budget or raise the margin") from exc
    model.fit_result = result
    model.default_n_ctx = result.n_ctx
    return model


# ---- explain -------------------------------------------------------------------------------------------
def explain(path: ModelPath, placement: PlacementSpec = None, *, n_gpu_layers: int = -1, **split: Any) -> Explanation:
    """Where every weight tensor of the model at `path` would go under `placement`, decided by llama.cpp
    itself in a dry-run load (no weights read or allocated), with the rule that placed each one.
    `split` takes load()'s split keywords: split_mode, tensor_split, main_gpu, devices."""
    tensors = read_gguf(path).tensors
    with Model(path, n_gpu_layers=n_gpu_layers, placement=placement, dry_run=True, progress=False, **split) as model:
        landed = read_back(model)
        resolution, plan = model.resolution, model.split
    return Explanation(describe(tensors, resolution, landed), resolution.unmatched, resolution.overrides, plan)


# ---- estimate ------------------------------------------------------------------------------------------
def _model_path(model: Model | ModelPath) -> Path:
    path = model if isinstance(model, (str, os.PathLike)) else model.path  # the path given, or a Model's
    return Path(os.fspath(path)).expanduser()


def estimate(model: Model | ModelPath, placement: PlacementSpec = None, *, n_ctx: int = 4096, n_seq: int = 1,
             type_k: str = "f16", type_v: str = "f16", flash_attn: bool | str = "auto", n_batch: int = 2048,
             n_ubatch: int = 512, draft: Model | ModelPath | None = None, draft_placement: PlacementSpec = None,
             n_gpu_layers: int = -1, use_mmap: bool = True, runtime: RuntimeSpec = None,
             mmproj: ModelPath | None = None, mmproj_device: str | None = None, **split: Any) -> Estimate:
    """Bytes of weights, KV cache and compute buffers per device (and host) for `model` (a path or a Model)
    under `placement` with a context of n_ctx tokens, from a dry run: nothing is read or allocated; plus each
    device's runtime row (what the process holds there beyond those buffers, runtime_cost.py).
    draft: a draft model (path or Model) whose needs are added, with a context of the same size.
    use_mmap: as the load will be (load's default: True); host weights it maps are reported as `mapped`.
    runtime: None = measured once per device and model (cached; the CPU and RPC devices have rules, no
    measurement); bytes or a size string for every measured device (GPUs); or {"CUDA0": "700MiB", ...}; 0
    leaves the row out.
    mmproj: a multimodal projector (llmplace.images) whose weights and compute buffers are added where its encoder
    goes: mmproj_device ("CUDA0" ..., or "CPU"), by default the first GPU, as Projector puts it.
    split takes load()'s split keywords (split_mode, tensor_split, main_gpu, devices)."""
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
    if mmproj is not None:
        for name, (weights, compute) in projector_memory(mmproj, device=mmproj_device).items():
            mine = memories.get(name, MemoryUse(name, 0, 0, 0))
            memories[name] = replace(mine, weights=mine.weights + weights, compute=mine.compute + compute)
    settings = ProbeSettings(n_batch=n_batch, n_ubatch=n_ubatch, n_seq=n_seq, type_k=type_k, type_v=type_v,
                             flash_attn=flash_attn)
    devs = [device_by_name(name) for name in memories if name != HOST]
    for name, cost in runtime_of(model, devs, settings, runtime, draft).items():
        memories[name] = replace(memories[name], runtime=cost.total)
    return Estimate(memories, chosen_ctx)


def runtime_of(model: Model | ModelPath, devs: Sequence[Any], settings: ProbeSettings, given: RuntimeSpec = None,
               draft: Model | ModelPath | None = None) -> dict[str, RuntimeCost]:
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

    def load_kwargs(self) -> dict[str, Any]:
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


def _resolve_budget(budget: Mapping[str, int | str] | None, devs: list[Any]) -> dict[int | str, int]:
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
        parts.append(f"{len(moved)} tensors ({human_size(n_bytes)}) of {span} overridden to {', '.join(to)}")
    return "; ".join(parts) or "everything on the devices as asked"


def fit(model: Model | ModelPath, *, budget: Mapping[str, int | str] | None = None, margin: int | str = "1GiB",
        n_ctx: int = 0, n_ctx_min: int = 4096, draft: Model | ModelPath | None = None, placement: PlacementSpec = None,
        n_seq: int = 1, type_k: str = "f16", type_v: str = "f16", flash_attn: bool | str = "auto",
        n_batch: int = 2048, n_ubatch: int = 512, devices: Sequence[str] | None = None, attempts: int = 3,
        use_mmap: bool = True, runtime: RuntimeSpec = None, dense: str = "auto", mmproj: ModelPath | None = None,
        mmproj_device: str | None = None) -> FitResult:
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
    mmproj: a multimodal projector to fit beside the model: its weights and compute buffers are set aside in
    the memory its encoder goes to (mmproj_device, as for estimate), and counted in the measured plan.
    Never raises for "does not fit": the result says success=False and why.
    """
    if dense not in ("auto", "layers", "hot"):
        raise InvalidParameterError(f"dense must be 'auto', 'layers' or 'hot', not {dense!r}")
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
    if mmproj is not None:  # the projector's bytes are left out of what llama.cpp's fit may give the model
        for name, (weights, compute) in projector_memory(mmproj, device=mmproj_device).items():
            if name in room:
                room[name] = max(0, room[name] - weights - compute)
    runtime_given = {name: cost.total for name, cost in costs.items()}  # measured once, not again per attempt
    split_kwargs: dict[str, Any] = {} if devices is None else {"devices": list(devices)}

    extra_margin = [0] * len(devs)
    n_ctx_try = n_ctx  # a context the fit shrinks itself sets a fixed size here (see below)
    result = None
    refits = shrinks = 0
    while True:
        mparams = C.llama_model_default_params()
        if devices is not None:
            # this local keeps the array alive while llama.cpp's fit reads it
            device_array = null_terminated("ggml_backend_dev_t", devs)
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
            # B023: measure_plan is called only within the iteration of the loop that defines it
            planned = estimate(path, rules, n_ctx=chosen_ctx, n_seq=n_seq, type_k=type_k, type_v=type_v,  # noqa: B023
                               flash_attn=flash_attn, n_batch=n_batch, n_ubatch=n_ubatch, draft=draft,
                               n_gpu_layers=layers, use_mmap=use_mmap, runtime=runtime_given,  # noqa: B023
                               mmproj=mmproj, mmproj_device=mmproj_device, **kw)  # noqa: B023
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
            reason = (f"host memory would hold {human_size(measured[HOST].total)}, over its budget of "
                      f"{human_size(usable[HOST])} with the devices as full as their budgets allow: this model and "
                      "context need more memory "
                      "than the budget gives (lower n_ctx, use a smaller quantization or raise the budget)")
            result = FitResult(False, chosen_ctx, ngl, split, combined, measured, f"{reason} ({changes})", usable)
        elif status == 0:
            reason = "; ".join(f"{name} would hold {human_size(usable[name] + b)}, {human_size(b)} over its "
                               f"{human_size(usable[name])}" for name, b in over.items())
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


def _experts_from_the_front(fitted: Placement, info: GGUFInfo, n_layer: int) -> list[Placement]:
    """llama.cpp's fit moves MoE experts to host memory from the last layer backwards. The same number of layers
    taken from the front (llama.cpp's --n-cpu-moe) decoded faster under the same cap on the H200 (Qwen3-30B-A3B
    shape at 12 GiB, 4 paired runs: 79-89 against 47-84 tok/s, README). When the fit moved only experts (and
    the boundary layer's router) of the last k layers, return n_cpu_moe(k) and n_cpu_moe(k + 1) to try first;
    otherwise nothing."""
    if not fitted.rules:
        return []
    moved = fitted.resolve(info.tensors).assignments
    roles = [role_of(a.tensor.name) for a in moved]
    if not moved or any(r not in ("experts", "router") for r in roles) or any(a.tensor.layer is None for a in moved):
        return []
    if any(not is_host_buffer(a.target) for a in moved):
        return []
    layers = sorted({a.tensor.layer for a, r in zip(moved, roles) if r == "experts" and a.tensor.layer is not None})
    if not layers or layers != list(range(layers[0], n_layer)):
        return []
    k = len(layers)
    return [n_cpu_moe(n) for n in (k, k + 1) if n <= n_layer]


# What one switch between host and device in a token's graph costs, as bytes of host memory read: each switch is
# a synchronisation and a copy of the activations. On the H200 (host reads ~83 GB/s), the F16 Llama-8B shape at
# 4 GiB decoded at the same speed (1.01x) with hot tensors first, which had 62 more switches and 165 MiB less on
# the host (61 MiB of weights, 104 MiB of KV cache): break-even at about 2.7 MiB a switch, counted as 3 MiB.
SWITCH_BYTES = 3 << 20


def _hot_tensors_first(info: GGUFInfo, n_layer: int, dev: Any, layers_plan: Estimate, measure: Measure, *,
                       force: bool = False) -> tuple[Placement, Estimate, str] | None:
    """For a dense model that does not fit whole on `dev`: keep attention, norms and the KV cache of every layer
    on the device and move the FFN weights (the bulk of a layer) of the first m layers to host memory, m as
    small as fits. Returns (placement, estimate, note) when that is modelled faster than whole layers on the
    host (`layers_plan`), or always when `force` and it fits; otherwise None.

    The model: decoding a token reads every host-resident weight and the host-resident KV cache from host
    memory (bandwidth-bound, as measured: README, "70B on 4 GiB"), plus SWITCH_BYTES per switch between host
    and device. Whole layers have the KV cache of their layers on the host and one switch each way; hot tensors
    first has none of the KV cache there but two switches per moved FFN."""
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

    def plan(count: int) -> tuple[Placement, Estimate] | None:
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
            f"0-{count - 1} in host memory (modelled host reads per token {human_size(cost_hot)} against "
            f"{human_size(cost_layers)} for whole layers)")
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
