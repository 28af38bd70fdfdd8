"""The device memory a process holds beyond llama.cpp's buffers: the "runtime" row of an estimate.

llama.cpp's memory breakdown (weights, KV cache, compute buffers) is exact, but it is not what nvidia-smi shows
for the process. A GPU backend also holds its own state on the device: for CUDA the context (on an H200 about
530 MiB before anything runs), the modules of the kernels it has run (loaded lazily), cuBLAS's handle and
workspace, the memory pool its kernels draw temporaries from (it grows to its peak and keeps it) and captured
CUDA graphs. A budget means the memory the process really uses, so that cost is counted as its own row.

How it is measured (never guessed): a child process loads the model with its last layers and its output on the
device (the model's own tensor types and shapes, so the same kernels, the same pool temporaries, the same cuBLAS
paths), with the caller's context settings, computes a prompt of one micro-batch and decodes a few tokens; while
it waits, this process reads the device's free memory. Then

    runtime = free before the child started - free while it waits - the child's own llama.cpp buffers
    context = free before the child started - free once it has only initialised the device

`context` is the part a process holds as soon as it touches the device: this process already holds it when it
reads free memory, so a plan bounded by free memory subtracts only `runtime - context`. The result is cached
per device, backend build, model file and context settings (~/.cache/llmplace/runtime.json, or $LLMPLACE_CACHE).

Devices with their own rule:
- the CPU and the host's RAM: 0. A host budget bounds llama.cpp's host buffers; the interpreter, the libraries
  and the page cache of a mapped file are outside it (the estimate reports mapped weights apart).
- RPC devices: 0 on this side. The server process holds its backend's state; the free memory it reports was
  read after its device was initialised, but the pools and workspaces its kernels grow later are not in any
  reading from here: leave a margin on a GPU-backed RPC server.
- anything else (CUDA, Vulkan, Metal, ... devices): measured as above.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

from . import logs
from ._ffi import C, c_string
from .backends import native_devices
from .cache import cache_root
from .errors import DeviceNotFoundError, InvalidParameterError, OutOfMemoryError
from .memory import breakdown, device_free, parse_size

# Tokens decoded one at a time after the prompt: enough for the decode kernels, and for CUDA graphs to be
# captured (the CUDA backend captures a graph once the same decode graph repeats).
_DECODE_STEPS = 6
# Layers the child offloads first (the last repeating layer and the output), then fewer if the device is too full.
_PROBE_LAYERS = (2, 1, 0)
# Free memory before and after the probe may differ this much before another process is suspected.
_DRIFT = 64 << 20


@dataclass(frozen=True)
class RuntimeCost:
    """Bytes a process holds on one device beyond llama.cpp's buffers."""

    device: str
    total: int    # after a prompt and a few decodes: context, kernel modules, library workspaces, pools, graphs
    context: int  # of `total`: held as soon as the process initialises the device
    source: str   # how it was obtained: "measured", "cached", "given", or the rule that applies ("rpc", "cpu")


def cache_file() -> Path:
    return cache_root() / "runtime.json"


def device_by_name(name: str):
    for dev in native_devices():
        if dev.name == name:
            return dev.ptr
    raise DeviceNotFoundError(f"no device named {name!r}")


def rule_for(dev) -> str | None:
    """The rule a device follows instead of a measurement ("cpu", "rpc"), or None: it is measured."""
    if C.ggml_backend_dev_type(dev) == C.GGML_BACKEND_DEVICE_TYPE_CPU:
        return "cpu"
    if c_string(C.ggml_backend_reg_name(C.ggml_backend_dev_backend_reg(dev))).upper() == "RPC":
        return "rpc"
    return None


@dataclass(frozen=True)
class ProbeSettings:
    """The context settings that change which kernels run and how large their temporaries are."""

    n_batch: int = 2048
    n_ubatch: int = 512
    n_seq: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str | bool = "auto"

    def key(self) -> str:
        return f"b{self.n_batch}-ub{self.n_ubatch}-s{self.n_seq}-k{self.type_k}-v{self.type_v}-fa{self.flash_attn}"


def _cache_key(dev, path: Path, settings: ProbeSettings) -> str:
    from ._build_info import LLAMA_CPP_COMMIT

    st = path.stat()
    _, total = device_free(dev)
    return "|".join([LLAMA_CPP_COMMIT[:12], c_string(C.ggml_backend_dev_name(dev)),
                     c_string(C.ggml_backend_dev_description(dev)), str(total), str(path.resolve()),
                     str(st.st_size), str(st.st_mtime_ns), settings.key()])


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict) -> None:
    path = cache_file()
    data = _read_cache()
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only home: measure again next time
        logs.logger.warning("could not cache the runtime measurement in %s: %s", path, exc)


def runtime_costs(path: Path, devs: Sequence, settings: ProbeSettings, given=None) -> dict[str, RuntimeCost]:
    """RuntimeCost per device name for `devs` (ggml device handles).

    given: None to measure (cached); a number of bytes / size string for every measured device (0 turns the
    row off); or a mapping {device name: bytes or size string}, whose devices are taken as given and the
    others measured."""
    if given is not None and not isinstance(given, Mapping):
        fixed = parse_size(given, "runtime")
        given = {c_string(C.ggml_backend_dev_name(d)): fixed for d in devs if rule_for(d) is None}
    given_lower = {str(k).lower(): v for k, v in (given or {}).items()}
    known = [dev.name for dev in native_devices()]
    for key in given_lower:
        if key not in {name.lower() for name in known}:
            raise InvalidParameterError(f"runtime names {key!r}, which is not a device here; devices: "
                                        f"{', '.join(known)}")
    result = {}
    for dev in devs:
        name = c_string(C.ggml_backend_dev_name(dev))
        if name.lower() in given_lower:
            result[name] = RuntimeCost(name, parse_size(given_lower[name.lower()], f"runtime[{name!r}]"), 0, "given")
            continue
        rule = rule_for(dev)
        if rule is not None:
            result[name] = RuntimeCost(name, 0, 0, rule)
            continue
        result[name] = measure(path, dev, settings)
    return result


def measure(path: Path, dev, settings: ProbeSettings, *, timeout: float = 900.0) -> RuntimeCost:
    """The runtime cost of `dev` for the model at `path` with `settings`, from the cache or measured by a child
    process (see the module's docstring)."""
    name = c_string(C.ggml_backend_dev_name(dev))
    key = _cache_key(dev, path, settings)
    cached = _read_cache().get(key)
    if cached is not None:
        return RuntimeCost(name, int(cached["total"]), int(cached["context"]), "cached")
    logs.logger.warning("measuring what %s holds beyond llama.cpp's buffers for %s (once; cached in %s)",
                        name, path.name, cache_file())
    last_error = None
    for _attempt in range(2):
        try:
            total, context, layers = _probe(path, dev, name, settings, timeout)
        except _Drift as exc:  # another process changed the device's memory meanwhile: measure again
            last_error = exc
            continue
        _write_cache(key, dict(total=total, context=context, probe_layers=layers,
                               measured=time.strftime("%Y-%m-%dT%H:%M:%S")))
        return RuntimeCost(name, total, context, "measured")
    raise OutOfMemoryError(f"could not measure {name}'s runtime cost: {last_error}; pass runtime={{'{name}': "
                           "'700MiB'}} (your own reading) to estimate/fit instead")


class _Drift(Exception):
    pass


def _probe(path: Path, dev, name: str, settings: ProbeSettings, timeout: float) -> tuple[int, int, int]:
    from .backends import registered_rpc_endpoints

    # the child registers the same RPC servers, so that it sees the same devices under the same names
    spec = dict(path=str(path), device=name, rpc_servers=registered_rpc_endpoints(), **settings.__dict__)
    free_before, _ = device_free(dev)
    env = dict(os.environ, LLMPLACE_LOG=os.environ.get("LLMPLACE_LOG", "error"))
    # stderr to a file, not a pipe: a child that logs more than a pipe holds would block on it
    errors = tempfile.TemporaryFile("w+")
    child = subprocess.Popen([sys.executable, "-m", "llmplace.runtime_cost", json.dumps(spec)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None  # both are pipes
    lines: queue.Queue[str | None] = queue.Queue()

    def read_lines(out: IO[str]) -> None:
        for line in out:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_lines, args=(stdout,), daemon=True).start()
    deadline = time.monotonic() + timeout

    def expect(stage: str) -> dict:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                child.kill()
                raise OutOfMemoryError(f"measuring {name}'s runtime cost took over {timeout:.0f} s") from None
            if line is None:
                child.wait()
                errors.seek(0)
                err = errors.read().strip().splitlines()[-5:]
                raise OutOfMemoryError(f"the process measuring {name}'s runtime cost ended early "
                                       f"(exit {child.returncode}): {' / '.join(err) or 'no message'}")
            if line.startswith("{"):
                message = json.loads(line)
                if message.get("stage") == stage:
                    return message

    try:
        expect("context")
        free_context, _ = device_free(dev)
        stdin.write("\n")
        stdin.flush()
        ready = expect("ready")
        free_ready, _ = device_free(dev)
        stdin.write("\n")
        stdin.flush()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        errors.close()
    free_after, _ = device_free(dev)
    if abs(free_after - free_before) > _DRIFT:
        raise _Drift(f"{name}'s free memory moved by {(free_after - free_before) >> 20} MiB during the measurement")
    context = max(0, free_before - free_context)
    total = max(context, free_before - free_ready - int(ready["buffers"]))
    return total, context, int(ready["n_gpu_layers"])


# ---- the child process ----------------------------------------------------------------------------------
def _child(spec: dict) -> None:
    import random

    from .backends import add_rpc_server, ensure_initialized
    from .context import Context
    from .errors import LlmplaceError
    from .model import Model

    def say(**message) -> None:
        print(json.dumps(message), flush=True)

    ensure_initialized()
    for endpoint in spec["rpc_servers"]:
        add_rpc_server(endpoint)
    dev = device_by_name(spec["device"])
    device_free(dev)  # the backend initialises the device here (CUDA: its context)
    say(stage="context")
    sys.stdin.readline()
    model = ctx = None
    error = None
    for layers in _PROBE_LAYERS:
        try:
            model = Model(spec["path"], devices=[spec["device"]], n_gpu_layers=layers, progress=False)
            ctx = Context(model, n_ctx=spec["n_ubatch"] + 64 * spec["n_seq"], n_batch=spec["n_batch"],
                          n_ubatch=spec["n_ubatch"], n_seq_max=spec["n_seq"], type_k=spec["type_k"],
                          type_v=spec["type_v"], flash_attn=spec["flash_attn"], n_threads=os.cpu_count() or 4)
            break
        except LlmplaceError as exc:
            error = exc
            if model is not None:
                model.close()
            model = ctx = None
    if ctx is None or model is None:  # both are set together
        raise SystemExit(f"could not load {spec['path']} with any layer on {spec['device']}: {error}")
    rng = random.Random(0)
    n_vocab = model.n_vocab
    tokens = [rng.randrange(n_vocab // 4, n_vocab // 2) for _ in range(min(spec["n_ubatch"], spec["n_batch"]))]
    ctx.decode(tokens)
    for _ in range(_DECODE_STEPS):
        ctx.decode_one(rng.randrange(n_vocab // 4, n_vocab // 2))
    ctx.synchronize()
    use = breakdown(ctx._ptr).get(spec["device"])
    say(stage="ready", buffers=0 if use is None else use.total, n_gpu_layers=layers)
    sys.stdin.readline()


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
