"""Placement: ordered rules that say which device holds which weight tensor.

For each weight tensor the first matching rule wins; tensors no rule matches follow `n_gpu_layers` as in
llama.cpp. A rule selects by regex on the tensor name (llama.cpp's semantics: ECMAScript std::regex,
substring search, evaluated by the same engine through the shim) and/or structured selectors (layers,
role, dtype, byte size, any predicate). Rules are resolved here against the model's real tensor table and
compiled into exact, anchored patterns merged per target, so what llama.cpp runs is exactly what
`explain` shows, and the override list stays far below `llama_max_tensor_buft_overrides()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, cast

from ._ffi import C, CData, c_string, ffi, null_terminated
from .backends import buffer_type, native_devices
from .errors import DeviceNotFoundError, PlacementError
from .gguf_info import TensorInfo
from .gguf_info import read as read_gguf
from .gguf_validate import block_size
from .logs import logger
from .pattern_limits import check_pattern

if TYPE_CHECKING:
    from ._handle import NativeObject

# Roles, by tensor name (llama.cpp's naming, shared by its architectures).
ROLES: dict[str, re.Pattern[str]] = {
    "experts": re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch)?exps\."),
    "shared_experts": re.compile(r"\.ffn_(up|down|gate|gate_up)_shexp\."),
    "router": re.compile(r"\.ffn_gate_inp(_shexp)?\."),
    "attention": re.compile(r"\.attn_(?!norm)"),
    "ffn": re.compile(r"\.ffn_(up|down|gate|gate_up)\."),
    "norm": re.compile(r"_norm\."),
    "embeddings": re.compile(r"^token_embd\."),
    "output": re.compile(r"^output\."),
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def role_of(name: str) -> str | None:
    """The role of a tensor name (the first of ROLES that matches), or None."""
    return next((role for role, pattern in ROLES.items() if pattern.search(name)), None)


def check_regex(pattern: str) -> None:
    """Raise PlacementError if the pattern could crash or stall llama.cpp's regex engine (see pattern_limits),
    or if that engine rejects it (it would fail the whole load)."""
    check_pattern(pattern)
    err = ffi.new("char[]", 512)
    if not C.llmplace_regex_check(pattern.encode(), err, len(err)):
        shown = pattern if len(pattern) <= 80 else pattern[:60] + f"... ({len(pattern)} characters)"
        raise PlacementError(f"invalid tensor pattern {shown!r}: {ffi.string(err).decode(errors='replace')} "
                             "(patterns are ECMAScript regular expressions matched anywhere in the tensor name)")


def regex_search(pattern: str, text: str) -> bool:
    """std::regex_search(text, std::regex(pattern)), exactly as llama.cpp's model loader matches overrides."""
    result: int = C.llmplace_regex_search(pattern.encode(), text.encode())
    if result < 0:
        check_regex(pattern)
    return result == 1


MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: no model has more
MAX_RANGE = 1 << 16  # a layers range longer than this is cut to MAX_LAYERS (its set would take all memory)


@dataclass(frozen=True)
class Rule:
    """Put the tensors this rule selects on `to` ("cpu", "gpu", "gpu:1", "CUDA0", "RPC0[host:port]", "CUDA_Host").

    Every given selector must hold: `pattern` (regex found in the name), `layers` (an int, range or
    iterable of layer indices), `role` (one of ROLES), `dtype` ("Q4_0", "F32" ...), `min_bytes` /
    `max_bytes`, `where` (any predicate on a TensorInfo, e.g. on its shape)."""

    to: str
    pattern: str | None = None
    layers: int | range | Iterable[int] | None = None
    role: str | None = None
    dtype: str | None = None
    min_bytes: int | None = None
    max_bytes: int | None = None
    where: Callable[[TensorInfo], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.to, str) or not self.to.strip():
            raise PlacementError(f"a rule needs a target device, got to={self.to!r}")
        if self.pattern is not None:
            check_regex(self.pattern)
        if self.role is not None and self.role not in ROLES:
            raise PlacementError(f"unknown role {self.role!r}; roles are: {', '.join(ROLES)}")
        if self.layers is not None:
            if isinstance(self.layers, range) and len(self.layers) > MAX_RANGE and self.layers.step > 0:
                # range(10**12) as a set took all memory: a range that long keeps the layers that can exist
                object.__setattr__(self, "layers", range(self.layers.start, min(self.layers.stop, MAX_LAYERS),
                                                         self.layers.step))
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise PlacementError(f"layers must be layer indices (ints >= 0), got {self.layers!r}")
            object.__setattr__(self, "layers", frozenset(layers))
        # checked here: a wrong type failed later, inside explain or the load, with an AttributeError
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise PlacementError(f"dtype must be a type name such as 'Q4_0' or 'F32', got {self.dtype!r}")
        for name in ("min_bytes", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise PlacementError(f"{name} must be a number of bytes (an int >= 0), got {value!r}")
        if self.min_bytes is not None and self.max_bytes is not None and self.min_bytes > self.max_bytes:
            raise PlacementError(f"min_bytes ({self.min_bytes}) is above max_bytes ({self.max_bytes}): the rule "
                                 "could match nothing")
        if self.where is not None and not callable(self.where):
            raise PlacementError(f"where must be a predicate on a TensorInfo (a function), got {self.where!r}")

    def matches(self, tensor: TensorInfo) -> bool:
        return ((self.pattern is None or regex_search(self.pattern, tensor.name))
                and (self.layers is None or tensor.layer in cast(frozenset[int], self.layers))  # see __post_init__
                and (self.role is None or role_of(tensor.name) == self.role)
                and (self.dtype is None or tensor.dtype.upper() == self.dtype.upper())
                and (self.min_bytes is None or tensor.n_bytes >= self.min_bytes)
                and (self.max_bytes is None or tensor.n_bytes <= self.max_bytes)
                and (self.where is None or bool(self.where(tensor))))


def summarize_rule(rule: Rule, width: int = 60) -> str:
    """A rule in one short line for messages: 'exps=cpu' for a pattern alone, else its selectors
    ('role=experts layers=0-15 -> cpu'). Its repr lists every layer and the whole pattern (thousands of
    characters for `layers=range(0, 48)` or a generated pattern), too long for a warning."""
    def short(text: str) -> str:
        return text if len(text) <= width else text[:width - 3] + "..."

    selectors = ("layers", "role", "dtype", "min_bytes", "max_bytes", "where")
    if rule.pattern is not None and all(getattr(rule, k) is None for k in selectors):
        return f"{short(rule.pattern)}={rule.to}"
    parts = [f"pattern={short(rule.pattern)}"] if rule.pattern is not None else []
    if rule.layers is not None:
        spans: list[list[int]] = []
        layers = sorted(cast(frozenset[int], rule.layers))  # a frozenset since __post_init__
        for layer in layers:  # contiguous runs as first-last
            if spans and layer == spans[-1][1] + 1:
                spans[-1][1] = layer
            else:
                spans.append([layer, layer])
        text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
        parts.append(f"layers={short(text) if layers else '(none)'}")
    parts += [f"{k}={getattr(rule, k)}" for k in ("role", "dtype", "min_bytes", "max_bytes") if getattr(rule, k)]
    if rule.where is not None:
        parts.append("where=<predicate>")
    return " ".join(parts) + f" -> {rule.to}"


@dataclass(frozen=True)
class Assignment:
    tensor: TensorInfo
    rule_index: int      # index of the first matching rule
    target: str


class Placement:
    """An ordered list of rules. Build one from Rules, (pattern, target) pairs or an `-ot` string:

        Placement([Rule("cpu", role="experts", layers=range(0, 16)), Rule("gpu:1", layers=range(16, 48))])
        Placement.parse(r"exps=CPU,blk\\.[0-9]\\.attn=CUDA0")
    """

    def __init__(self, rules: Iterable[Rule] = (), *, strict: bool = False, use_every_gpu: bool = False) -> None:
        self.rules = list(rules)
        self.strict = strict  # a rule that selects no tensor raises instead of warning
        self.use_every_gpu = use_every_gpu  # distribute(): choose the split mode over all GPUs
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise PlacementError(f"a Placement holds Rule objects, got {rule!r}; use Placement.parse for "
                                     "strings and (pattern, target) pairs")

    @classmethod
    def parse(cls, spec: "str | Placement | Rule | Sequence[Rule | tuple[str, str]] | None") -> "Placement":
        """Accept a Placement, a Rule, a list of Rules and/or (pattern, target) pairs, or llama.cpp's
        `-ot` syntax ("pattern=target,pattern=target")."""
        if spec is None:
            return cls()
        if isinstance(spec, Placement):
            return spec
        if isinstance(spec, Rule):
            return cls([spec])
        if isinstance(spec, str):
            rules = []
            for item in filter(None, (part.strip() for part in spec.split(","))):
                pattern, sep, target = item.rpartition("=")
                if not sep or not pattern or not target:
                    raise PlacementError(f"cannot read {item!r} in {spec!r}: each item must be "
                                         "'<tensor name regex>=<device>', e.g. 'exps=CPU'")
                rules.append(Rule(target, pattern=pattern))
            return cls(rules)
        rules = []
        for entry in spec:
            if isinstance(entry, Rule):
                rules.append(entry)
            elif isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
                rules.append(Rule(entry[1], pattern=entry[0]))
            else:
                raise PlacementError(f"cannot read placement item {entry!r}: give a Rule or a (pattern, target) pair")
        return cls(rules)

    def __add__(self, other: "Placement") -> "Placement":
        other = Placement.parse(other)
        return Placement(self.rules + other.rules, strict=self.strict or other.strict,
                         use_every_gpu=self.use_every_gpu or other.use_every_gpu)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        flags = "".join(f", {name}=True" for name in ("strict", "use_every_gpu") if getattr(self, name))
        return f"Placement({self.rules!r}{flags})"

    def assign(self, tensors: Sequence[TensorInfo]) -> list[Assignment]:
        """The first matching rule of each tensor (tensors no rule matches are left out)."""
        result = []
        for tensor in tensors:
            for index, rule in enumerate(self.rules):
                if rule.matches(tensor):
                    result.append(Assignment(tensor, index, rule.to))
                    break
        return result

    def resolve(self, tensors: Sequence[TensorInfo]) -> "Resolution":
        """Match the rules against a model's tensor table once; everything else (unmatched rules, the
        compiled overrides, the rule of each tensor in explain/placement_report) is derived from this."""
        assignments = self.assign(tensors)
        used = {a.rule_index for a in assignments}
        return Resolution(assignments, [i for i in range(len(self.rules)) if i not in used],
                          compile_overrides(assignments))

    def unmatched_rules(self, tensors: Sequence[TensorInfo]) -> list[int]:
        """Indices of rules that select no tensor at all (llama.cpp ignores such patterns silently)."""
        return self.resolve(tensors).unmatched

    def compile(self, tensors: Sequence[TensorInfo]) -> list[tuple[str, str]]:
        """(pattern, target) overrides for llama.cpp (see `compile_overrides`)."""
        return self.resolve(tensors).overrides


# What Placement.parse reads: a Placement, a Rule, a list of Rules and/or (pattern, target) pairs, or `-ot` text
PlacementSpec = str | Placement | Rule | Sequence[Rule | tuple[str, str]] | None


@dataclass(frozen=True)
class Resolution:
    """A Placement's rules resolved against one model's tensors."""

    assignments: list[Assignment]       # tensors some rule selected, with the first rule that did
    unmatched: list[int]                # indices of rules that selected nothing
    overrides: list[tuple[str, str]]    # what is handed to llama.cpp

    def rule_of(self) -> dict[str, int]:
        return {a.tensor.name: a.rule_index for a in self.assignments}


EMPTY_RESOLUTION = Resolution([], [], [])


def compile_overrides(assignments: Sequence[Assignment]) -> list[tuple[str, str]]:
    """(pattern, target) overrides for llama.cpp: exact anchored names, merged per target as
    `^blk\\.(?:0|1|7)\\.ffn_up_exps\\.weight$` so the list stays short and each pattern small."""
    by_target: dict[str, dict[str, list[int]]] = {}
    singles: dict[str, list[str]] = {}
    for a in assignments:
        m = _LAYER_NAME.match(a.tensor.name)
        if m:
            by_target.setdefault(a.target, {}).setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            singles.setdefault(a.target, []).append(a.tensor.name)
    overrides = []
    for target, suffixes in by_target.items():
        for suffix, layers in suffixes.items():
            alternatives = "|".join(str(i) for i in sorted(set(layers)))
            overrides.append((rf"^blk\.(?:{alternatives})\.{re.escape(suffix)}$", target))
    for target, names in singles.items():
        overrides.extend((f"^{re.escape(name)}$", target) for name in names)
    return overrides


# ---- compiling everything into llama_model_params ------------------------------------------------------
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2, "tensor": 3}


def model_devices(names: Sequence[str] | None = None) -> list[CData]:
    """The devices a model is split across, in llama.cpp's order: `names` as given, or by default RPC
    devices, then GPUs, then integrated GPUs only if there is no discrete GPU (never the CPU)."""
    all_devs = native_devices()
    if names is not None:
        chosen = []
        for name in names:
            dev = next((d for d in all_devs if d.name.lower() == str(name).lower()), None)
            if dev is None:
                raise DeviceNotFoundError(f"no device named {name!r}; devices here: "
                                          f"{', '.join(d.name for d in all_devs)}")
            if dev.type == C.GGML_BACKEND_DEVICE_TYPE_CPU:
                raise PlacementError("devices= lists the devices to offload to; the CPU always takes part, "
                                     "leave it out")
            chosen.append(dev.ptr)
        return chosen
    rpc = [d.ptr for d in all_devs if d.backend == "RPC"]
    gpus = [d.ptr for d in all_devs if d.type == C.GGML_BACKEND_DEVICE_TYPE_GPU and d.backend != "RPC"]
    igpus = [d.ptr for d in all_devs if d.type == C.GGML_BACKEND_DEVICE_TYPE_IGPU]
    return rpc + gpus + (igpus if not gpus else [])


@dataclass(frozen=True)
class SplitPlan:
    """How a model's layers are spread over the offload devices, and why."""

    mode: str                    # the split mode handed to llama.cpp: "none", "layer", "row" or "tensor"
    devices: tuple[str, ...]     # offload devices, in llama.cpp's order (tensor_split and main_gpu index this)
    reason: str                  # why this mode; for distribute() also why not tensor split


# Weights llama.cpp's tensor split cuts along their contiguous dimension (ne0): each device needs at least
# one whole quantization block per row, or the loader asserts ("tensor write out of bounds") and aborts.
_SPLIT_ALONG_ROWS = re.compile(r"\.(ffn_down(_exps|_shexp)?|attn_output)\.weight$")


def tensor_split_blocker(path: Path, placement: Placement, n_devices: int) -> str | None:
    """Why llama.cpp's tensor split cannot run this model here (None if it can). Each reason is a case
    where llama.cpp would refuse late with a generic error or abort the process."""
    if n_devices < 2:
        return f"tensor split needs two or more GPUs and {n_devices} offload device(s) are present"
    if placement.rules:
        return ("placement rules move tensors to chosen devices, and llama.cpp's tensor split cannot combine "
                "with tensor overrides (its first decode aborts)")
    info = read_gguf(path)
    supported = C.llmplace_arch_supports_tensor_split(info.arch.encode())
    if supported != 1:
        return f"llama.cpp has no tensor split for the {info.arch!r} architecture"
    for t in info.tensors:
        if _SPLIT_ALONG_ROWS.search(t.name):
            block = block_size(t.dtype)
            if t.shape[0] // block < n_devices:
                return (f"{t.name} ({t.dtype}, rows of {t.shape[0]}) has {t.shape[0] // block} quantization block(s) "
                        f"per row, fewer than the {n_devices} devices it would be cut across")
    return None


def plan_split(path: Path, placement: Placement, devs: list[CData], split_mode: str) -> SplitPlan:
    names = tuple(c_string(C.ggml_backend_dev_name(d)) for d in devs)
    if placement.use_every_gpu:
        blocker = tensor_split_blocker(path, placement, len(devs))
        if blocker is None:
            return SplitPlan("tensor", names, f"tensor split over {len(devs)} GPUs: each layer's matrices are cut "
                                              "across all of them, so they all work on every token")
        return SplitPlan("layer", names, f"layer split over {len(devs)} device(s), not tensor split: {blocker}")
    if split_mode == "tensor":
        blocker = tensor_split_blocker(path, placement, max(len(devs), 2))
        if blocker is not None:
            raise PlacementError(f"split_mode='tensor' cannot be used: {blocker}; use split_mode='layer'")
    return SplitPlan(split_mode, names, "as requested")


def layer_shares_for_bytes(path: Path, shares: Sequence[float], n_gpu_layers: int,
                           overridden: frozenset[str] = frozenset()) -> list[float]:
    """llama.cpp tensor_split values under which, in layer split mode, each device's weight bytes follow
    `shares` as closely as whole layers allow.

    llama.cpp reads tensor_split as shares of *layers*: offloaded layer j of n goes to the first device whose
    cumulative share exceeds j / n, and the output counts as one more layer. Layers are alike but the output
    layer (vocabulary x n_embd) is not, so 1:1 on a Llama-70B-shaped model put 41 layers on GPU 0 and 39 plus
    the output on GPU 1: 1.039:1 in bytes (seen on two H200s). Here each boundary is put where the cumulative
    bytes come closest to the cumulative share, then written as the shares that make llama.cpp draw exactly
    those boundaries (a boundary after k layers: a cumulative share of (k - 0.5) / n). Tensors that placement
    rules move elsewhere (`overridden`) do not count."""
    info = read_gguf(path)
    n_layer = int(info.metadata.get(f"{info.arch}.block_count", 0))
    units = [0] * (n_layer + 1)  # bytes per layer; index n_layer is the output layer
    has_output = any(t.name == "output.weight" for t in info.tensors)
    for t in info.tensors:
        if t.name in overridden:
            continue
        if t.layer is not None and t.layer < n_layer:
            units[t.layer] += t.n_bytes
        elif t.name.startswith("output") or (t.name == "token_embd.weight" and not has_output):
            units[n_layer] += t.n_bytes  # a tied output is a copy of token_embd on the output layer's device
    count = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    offloaded = units[n_layer + 1 - count:]
    total = sum(offloaded)
    weight_sum = sum(shares)
    if count == 0 or total == 0:
        return [w / weight_sum for w in shares]
    cumulative = [0]
    for n_bytes in offloaded:
        cumulative.append(cumulative[-1] + n_bytes)
    boundaries, target, k = [], 0.0, 0
    for w in shares[:-1]:
        target += w / weight_sum * total
        if w > 0:  # a device with no share gets no layer
            k = min(range(k, count + 1), key=lambda j: abs(cumulative[j] - target))
        boundaries.append(k)
    cuts = [max(b - 0.5, 0.0) / count for b in boundaries] + [1.0]
    return [cut - previous for previous, cut in zip([0.0] + cuts[:-1], cuts)]


def configure(params: CData, path: Path, placement: Placement, *, split_mode: str = "layer",
              tensor_split: Sequence[float] | None = None, main_gpu: int = 0, devices: Sequence[str] | None = None,
              n_gpu_layers: int = -1, split_by: str = "bytes") -> tuple[Resolution, SplitPlan, list[CData]]:
    """Fill the placement fields of llama_model_params, validating everything llama.cpp would otherwise
    abort on or reject with a generic error. Returns (the resolved rules, the split plan, C objects to keep
    alive during the load)."""
    keep_alive: list[CData] = []
    if split_mode not in SPLIT_MODES:
        raise PlacementError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, not {split_mode!r}")
    devs = model_devices(devices)
    split = plan_split(path, placement, devs, split_mode)
    split_mode = split.mode
    if devices is not None:
        array = null_terminated("ggml_backend_dev_t", devs)
        params.devices = array
        keep_alive.append(array)
    if isinstance(main_gpu, bool) or not isinstance(main_gpu, int) or main_gpu < 0 or (devs and main_gpu >= len(devs)):
        raise PlacementError(f"main_gpu={main_gpu!r} is not an index into the {len(devs)} offload device(s) "
                             f"({', '.join(split.devices) or 'none'})")
    if split_mode == "row":
        main = devs[main_gpu] if devs else ffi.NULL
        reg = C.ggml_backend_dev_backend_reg(main) if main != ffi.NULL else ffi.NULL
        if reg == ffi.NULL or C.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_split_buffer_type") == ffi.NULL:
            raise PlacementError("split_mode='row' needs a backend with split buffers, and none of this machine's "
                                 "devices has one (CUDA dropped them too); use split_mode='layer' or 'tensor'")
    params.split_mode = SPLIT_MODES[split_mode]
    params.main_gpu = main_gpu
    if tensor_split is not None:
        weights = list(tensor_split)
        max_devices = C.llama_max_devices()
        if not weights or len(weights) > max(len(devs), 1) or len(weights) > max_devices:
            raise PlacementError(f"tensor_split has {len(weights)} entries for {len(devs)} offload device(s); give "
                                 "one non-negative weight per device, in llama.cpp's device order")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf")
               for w in weights) or sum(weights) <= 0:
            raise PlacementError(f"tensor_split weights must be finite numbers >= 0 with a positive sum, got {weights}")
        if split_by not in ("bytes", "layers"):
            raise PlacementError(f"split_by must be 'bytes' or 'layers', not {split_by!r}")
    resolution = EMPTY_RESOLUTION
    if placement.rules:
        resolution = placement.resolve(read_gguf(path).tensors)
        if resolution.unmatched:
            described = "; ".join(f"rule {i} ({summarize_rule(placement.rules[i])})" for i in resolution.unmatched)
            message = f"placement rules that select no tensor of {Path(path).name}: {described}"
            if placement.strict:
                raise PlacementError(message + " (Placement(strict=True))")
            logger.warning("%s", message)
        overrides = resolution.overrides
        limit = C.llama_max_tensor_buft_overrides()
        if len(overrides) >= limit:
            raise PlacementError(f"the placement compiles to {len(overrides)} overrides; llama.cpp takes at most "
                                 f"{limit - 1}: use fewer distinct targets or coarser rules")
        patterns = [ffi.new("char[]", pattern.encode()) for pattern, _ in overrides]
        keep_alive.extend(patterns)
        array = null_terminated("struct llama_model_tensor_buft_override",
                                [{"pattern": c_pattern, "buft": buffer_type(target)[0]}
                                 for c_pattern, (_, target) in zip(patterns, overrides)])
        params.tensor_buft_overrides = array
        keep_alive.append(array)
    if tensor_split is not None:
        if split_mode == "layer" and split_by == "bytes" and len(weights) > 1:
            overridden = frozenset(a.tensor.name for a in resolution.assignments)
            weights = layer_shares_for_bytes(path, weights, n_gpu_layers, overridden)
        array = ffi.new("float[]", max_devices)
        for i, w in enumerate(weights):
            array[i] = w / sum(weights)
        params.tensor_split = array
        keep_alive.append(array)
    return resolution, split, keep_alive


# ---- presets -------------------------------------------------------------------------------------------
EXPERTS_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def cpu_moe() -> Placement:
    """All MoE expert weights in host memory (llama.cpp's --cpu-moe)."""
    return Placement([Rule("cpu", pattern=EXPERTS_PATTERN)])


def n_cpu_moe(n: int) -> Placement:
    """The expert weights of layers 0 .. n-1 in host memory (llama.cpp's --n-cpu-moe N)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PlacementError(f"n_cpu_moe needs a layer count >= 0, got {n!r}")
    # no model has more than llama.cpp's LLAMA_MAX_LAYERS (512): a larger n (999 for "all", as with llama.cpp's
    # flag) means every layer, and one rule per layer up to 10^7 took minutes to build and match
    return Placement([Rule("cpu", pattern=rf"blk\.{i}{EXPERTS_PATTERN}") for i in range(min(n, MAX_LAYERS))])


def distribute() -> Placement:
    """Use every GPU (one flag). Tensor split where llama.cpp can run it for this model and these settings:
    it cuts each layer's matrices across all GPUs, so they work together on every token (on 2 x H200 a 70B
    model decoded 1.33x faster than on one GPU); otherwise layer split, which adds memory but not speed.
    The reason for the choice is in `model.split.reason` and in `explain`. Combine with rules as
    `cpu_moe() + distribute()` (rules force layer split)."""
    return Placement(use_every_gpu=True)


def experts(*, to: str = "cpu", layers: int | range | Iterable[int] | None = None) -> Placement:
    """The expert weights (of `layers`, default all) on `to`."""
    return Placement([Rule(to, role="experts", layers=layers)])


# ---- explain before load, verify after -------------------------------------------------------------------
def is_host_buffer(buffer_type: str) -> bool:
    """Whether a buffer type holds its tensors in host RAM: "CPU", "CPU_Mapped" (the mmap'd file),
    "CPU_REPACK" (repacked for faster CPU kernels) and GPUs' pinned host memory ("CUDA_Host" ...)."""
    return buffer_type.startswith("CPU") or buffer_type.endswith("_Host")


@dataclass(frozen=True)
class TensorPlacement:
    """Where one weight tensor goes (explain) or went (placement_report)."""

    name: str
    layer: int | None
    role: str | None
    dtype: str
    shape: tuple[int, ...]
    n_bytes: int
    buffer_type: str          # as llama.cpp decided: "CPU", "CPU_REPACK", "CUDA0", "RPC0[...]" ...
    rule: int | None          # index of the rule that placed it, None when n_gpu_layers decided

    @property
    def memory(self) -> str:
        """Whose memory holds it: "host" for every host-RAM buffer type (see is_host_buffer), else the
        device's buffer type ("CUDA0", "RPC1[...]"). Explain's dry run maps nothing, so host weights show
        the buffer type llama.cpp picks without mmap (pinned "CUDA_Host" when there is a GPU), where a
        loaded model shows "CPU_Mapped": both are host memory, which is what this compares."""
        return "host" if is_host_buffer(self.buffer_type) else self.buffer_type


@dataclass(frozen=True)
class Explanation:
    tensors: list[TensorPlacement]
    unmatched_rules: list[int]          # rules that selected nothing
    overrides: list[tuple[str, str]]    # what was handed to llama.cpp
    split: SplitPlan | None = None      # the split mode chosen, over which devices, and why

    def totals(self) -> dict[str, int]:
        """Bytes of weights per buffer type."""
        result: dict[str, int] = {}
        for t in self.tensors:
            result[t.buffer_type] = result.get(t.buffer_type, 0) + t.n_bytes
        return result

    def memory_totals(self) -> dict[str, int]:
        """Bytes of weights per memory: "host" (RAM, whatever the host buffer type) and each device."""
        result: dict[str, int] = {}
        for t in self.tensors:
            result[t.memory] = result.get(t.memory, 0) + t.n_bytes
        return result


def read_back(model: NativeObject) -> dict[str, tuple[str, int]]:
    """{tensor name: (buffer type name, bytes)} of a loaded model, read from llama.cpp through the shim."""
    name, buft, n_bytes = ffi.new("char **"), ffi.new("char **"), ffi.new("uint64_t *")
    result = {}
    ptr = model._ptr
    for i in range(C.llmplace_model_tensor_count(ptr)):
        if C.llmplace_model_tensor_info(ptr, i, name, buft, n_bytes):
            result[ffi.string(name[0]).decode()] = (ffi.string(buft[0]).decode(), int(n_bytes[0]))
    return result


def describe(tensors: Sequence[TensorInfo], resolution: Resolution, landed: dict[str, tuple[str, int]]
             ) -> list[TensorPlacement]:
    rule_of = resolution.rule_of()
    return [TensorPlacement(name=t.name, layer=t.layer, role=role_of(t.name), dtype=t.dtype, shape=t.shape,
                            n_bytes=t.n_bytes, buffer_type=landed.get(t.name, ("", 0))[0], rule=rule_of.get(t.name))
            for t in tensors]

