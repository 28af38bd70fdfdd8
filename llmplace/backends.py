"""Backends and devices: load ggml's backend modules from llmplace's own folders, list the devices.

ggml, when asked to load "all" backends, scans the current directory and the interpreter's folder and
silently skips modules that fail to load. llmplace instead loads exactly the modules shipped in its
package folder (and in installed plugin packages, see `backend_dirs`), before `llama_backend_init`,
and records every failure so `llmplace.devices()` / `llmplace devices` can say why a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import logs, rpc
from ._ffi import LIB_DIR, C, CData, SharedLibrary, c_string, ffi
from .errors import BuildError, DeviceNotFoundError

# Plugin distributions (one GPU backend each) install a package of this name holding libggml-<name>.so.
PLUGIN_PACKAGES = ("llmplace_cuda13", "llmplace_cuda12", "llmplace_vulkan", "llmplace_metal")

_KINDS = {
    C.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    C.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    C.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    C.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
    C.GGML_BACKEND_DEVICE_TYPE_META: "meta",
}


@dataclass(frozen=True)
class BackendModule:
    """One backend module file and what became of it."""

    name: str             # ggml's backend name: "cpu", "rpc", "cuda" ...
    path: Path
    loaded: bool
    error: str = ""       # why it did not load (the dynamic loader's message), empty when loaded


@dataclass(frozen=True)
class Device:
    """A device llama.cpp can place tensors on."""

    index: int                  # position in ggml's device list
    name: str                   # "CPU", "CUDA0", "RPC0[127.0.0.1:50052]" ... (what `-ot` rules name)
    description: str
    kind: str                   # "cpu", "gpu", "igpu", "accel", "rpc" or "meta"
    backend: str                # the backend registry's name: "CPU", "CUDA", "RPC" ...
    memory_free: int            # bytes
    memory_total: int           # bytes
    buffer_type: str            # the device's default buffer type ("CPU", "CUDA0" ...)
    host_buffer_type: str | None  # pinned host memory of a GPU ("CUDA_Host"), None when there is none


@dataclass(frozen=True)
class NativeDevice:
    """A ggml backend device with its handles: what llmplace's own modules enumerate and hand to llama.cpp
    (`native_devices`). Users see `Device`, which holds no pointer."""

    index: int          # position in ggml's device list
    name: str
    description: str
    type: int           # enum ggml_backend_dev_type (C.GGML_BACKEND_DEVICE_TYPE_CPU, _GPU ...)
    kind: str           # as Device.kind: an RPC server's device is "rpc" whatever type it reports
    backend: str        # the backend registry's name: "CPU", "CUDA", "RPC" ...
    reg: object         # ggml_backend_reg_t
    ptr: object         # ggml_backend_dev_t

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes as the backend reports them now (see `device_memory`)."""
        return device_memory(self.ptr)

    def buffer_type(self) -> CData:
        """The device's default buffer type (ggml_backend_buffer_type_t)."""
        return C.ggml_backend_dev_buffer_type(self.ptr)

    def host_buffer_type(self) -> CData:
        """The device's pinned host memory buffer type, or NULL when it has none (the CPU, RPC)."""
        return C.ggml_backend_dev_host_buffer_type(self.ptr)


def native_devices() -> list[NativeDevice]:
    """Every device ggml knows now, in its order, with its handles: the one place llmplace enumerates them."""
    ensure_initialized()
    found = []
    for index in range(C.ggml_backend_dev_count()):
        dev = C.ggml_backend_dev_get(index)
        reg = C.ggml_backend_dev_backend_reg(dev)
        backend, dev_type = c_string(C.ggml_backend_reg_name(reg)), C.ggml_backend_dev_type(dev)
        found.append(NativeDevice(
            index=index, name=c_string(C.ggml_backend_dev_name(dev)),
            description=c_string(C.ggml_backend_dev_description(dev)), type=dev_type,
            kind="rpc" if backend.upper() == "RPC" else _KINDS.get(dev_type, "unknown"),
            backend=backend, reg=reg, ptr=dev))
    return found


def device_memory(dev: CData) -> tuple[int, int]:
    """(free, total) bytes of a ggml device (ggml_backend_dev_t), as its backend reports them now. For the CPU
    that is all of the host's RAM; `Device.memory_free` gives the honest figure (see `_host_available`)."""
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    C.ggml_backend_dev_memory(dev, free, total)
    return int(free[0]), int(total[0])


_lock = threading.Lock()
_modules: list[BackendModule] = []
_rpc_devices: dict[str, list[Device]] = {}   # endpoint → its devices, each server registered once
_initialized = False


def plugin_mismatch(folder: Path) -> str | None:
    """Why a plugin folder must not be loaded (None if it matches this build). A backend module from another
    llama.cpp commit or llmplace version links against a different ggml-base: loading it could crash."""
    from ._version import __version__

    info_path = folder / "_build_info.py"
    info: dict[str, object] = {}
    try:
        exec(compile(info_path.read_text(), str(info_path), "exec"), info)  # noqa: S102 - our own build's file
    except OSError:
        return f"{folder} has no _build_info.py: not a plugin built for llmplace"
    try:
        from ._build_info import LLAMA_CPP_COMMIT
    except ImportError:  # pragma: no cover - a source tree without the compiled parts
        return None
    theirs = (info.get("LLAMA_CPP_COMMIT"), info.get("LLMPLACE_VERSION"))
    if theirs != (LLAMA_CPP_COMMIT, __version__):
        return (f"the plugin in {folder} was built for llmplace {theirs[1]} from llama.cpp {str(theirs[0])[:10]}, "
                f"but this is llmplace {__version__} from llama.cpp {LLAMA_CPP_COMMIT[:10]}: install the plugin "
                f"version that matches (pip install '{folder.name.replace('_', '-')}=={__version__}')")
    return None


def backend_dirs() -> list[Path]:
    """Folders llmplace loads backend modules from: its own, then each installed plugin's (plugins built
    from another llama.cpp commit or llmplace version are refused, see `backend_modules()`)."""
    dirs = [LIB_DIR]
    for package in PLUGIN_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(p) for p in spec.submodule_search_locations)
    return dirs


def _backend_name(path: Path) -> str:
    # libggml-cpu-haswell.so → "cpu"; libggml-rpc.so → "rpc"
    return path.name[len("libggml-"):-len(".so")].split("-")[0]


# Libraries a GPU module needs from the system (the plugins never carry them: tools/build_wheels.sh), and what
# installs them. The dynamic loader only says "libcudart.so.12: cannot open shared object file".
_RUNTIME_HINTS = (
    (re.compile(r"(libcudart|libcublas|libcublasLt)\.so\.(\d+): cannot open"),
     "the CUDA {1} runtime ({0}) is not installed or not on the library path: install the CUDA {1} toolkit (or its "
     "runtime libraries: cudart and cuBLAS) and, if it is not in a system folder, add its lib64 folder to "
     "LD_LIBRARY_PATH; or install the llmplace CUDA plugin that matches the toolkit you have (llmplace[cuda12] or "
     "llmplace[cuda13])"),
    (re.compile(r"libcuda\.so\.1: cannot open"),
     "no NVIDIA driver here (libcuda.so.1 is the driver's library): install the NVIDIA driver, or leave the CUDA "
     "plugin out"),
    (re.compile(r"libvulkan\.so\.1: cannot open"),
     "the Vulkan loader is not installed: install it and a driver (Debian/Ubuntu: apt-get install libvulkan1 "
     "mesa-vulkan-drivers; NVIDIA's driver brings its own Vulkan driver)"),
)


def _load_failure(path: Path, messages: list[str]) -> str:
    """Why ggml_backend_load refused a module, from ggml's own log lines: the dynamic loader's message
    ("load_backend: failed to load PATH: <dlerror>", with what installs a missing GPU runtime), a missing
    ggml_backend_init, another backend API version."""
    for line in messages:
        _, _, loader_message = line.partition(f"failed to load {path}: ")
        if loader_message:
            for pattern, hint in _RUNTIME_HINTS:
                found = pattern.search(loader_message)
                if found:
                    return f"{loader_message}: {hint.format(*found.groups())}"
            return loader_message
    return "; ".join(line.removeprefix("load_backend: ") for line in messages if line) or (
        "the module loaded but did not register a backend (wrong ggml version, or it does not support this system?)")


def _load_module(name: str, path: Path) -> BackendModule:
    logs.install()  # ggml says why a module did not load only in its log
    with logs.capture() as messages:
        reg = C.ggml_backend_load(str(path).encode())
    if reg != ffi.NULL:
        return BackendModule(name, path, True)
    return BackendModule(name, path, False, _load_failure(path, messages))


def _variant_score(path: Path) -> int:
    """ggml_backend_score() of a CPU-variant module: 0 if this CPU lacks its instructions (or it does not load).
    ggml does not offer it through a backend registry (the module is not registered yet), so it is looked up in the
    module itself, which is then released: only the chosen variant stays loaded."""
    try:
        with SharedLibrary(path) as module:
            score = module.function("ggml_backend_score", "int (*)(void)")
            return int(score()) if score is not None else 0
    except OSError:
        return 0


def _load_from(directory: Path) -> list[BackendModule]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("libggml-*.so")):
        groups.setdefault(_backend_name(path), []).append(path)
    results = []
    for name, paths in groups.items():
        if len(paths) > 1:
            # CPU variants (one per instruction set): take the best this machine runs, as ggml does.
            scored = sorted(((_variant_score(p), p) for p in paths), reverse=True)
            best_score, best = scored[0]
            if best_score == 0:
                results.append(BackendModule(name, directory, False,
                                             "no variant of this backend supports this CPU"))
                continue
            paths = [best]
        results.append(_load_module(name, paths[0]))
    return results


def ensure_initialized() -> None:
    """Install the log callback, load the backend modules, then `llama_backend_init` (once)."""
    global _initialized
    if _initialized:
        return
    with _lock:
        if _initialized:
            return
        logs.install()
        for directory in backend_dirs():
            mismatch = plugin_mismatch(directory) if directory != LIB_DIR else None
            if mismatch is not None:
                logs.logger.warning("%s", mismatch)
                _modules.append(BackendModule(directory.name, directory, False, mismatch))
                continue
            modules = _load_from(directory)
            for module in modules:
                if not module.loaded:
                    logs.logger.warning("backend %s (%s) did not load: %s", module.name, module.path, module.error)
            _modules.extend(modules)
        C.llama_backend_init()
        _initialized = True


def cpu_backend_function(name: str, signature: str) -> CData:
    """A function of the CPU backend module, e.g. ggml_threadpool_new. With dynamically loaded backends
    these are not link-time symbols; they are reached through the backend registry's proc-address table."""
    ensure_initialized()
    reg = C.ggml_backend_reg_by_name(b"CPU")
    pointer = C.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg != ffi.NULL else ffi.NULL
    if pointer == ffi.NULL:
        raise BuildError(f"the CPU backend does not provide {name}; is it loaded? (see llmplace.backend_modules())")
    return ffi.cast(signature, pointer)


_cpu_pause_lock = threading.Lock()
_cpu_pause: list[Any] = []  # once looked up: [the function or None, the module handle that keeps it valid]


def cpu_threadpool_pause() -> CData | None:
    """ggml_threadpool_pause of the loaded CPU backend module, as a cffi function pointer
    (void (*)(struct ggml_threadpool *)), or None where it cannot be found (then threads are not paused: correct,
    only slower). At the pinned commit the CPU backend's ggml_backend_reg_get_proc_address offers
    ggml_threadpool_new, _free and ggml_backend_cpu_set_threadpool but not the pause, so it is looked up in the
    module ggml already loaded (RTLD_NOLOAD: never a second copy)."""
    with _cpu_pause_lock:
        if not _cpu_pause:
            function, module = None, None
            for loaded in backend_modules():
                if loaded.name == "cpu" and loaded.loaded:
                    try:
                        module = SharedLibrary(loaded.path, already_loaded=True)
                    except OSError:
                        break
                    function = module.function("ggml_threadpool_pause", "void (*)(struct ggml_threadpool *)")
                    break
            _cpu_pause.extend((function, module))
        return _cpu_pause[0]


def buffer_type(target: str) -> tuple[CData, str]:
    """Resolve a placement target to (buffer type handle, its name).

    Accepted: "cpu"; "gpu" / "gpu:N" (the N-th GPU, in ggml's device order); "cuda_host" / "gpu_host:N"
    (that GPU's pinned host memory); a device name ("CUDA0", "RPC0"), meaning its default buffer type; or a
    buffer type name ("CUDA_Host", "RPC0[127.0.0.1:50052]"). Case-insensitive."""
    wanted = target.strip().lower()
    devs = native_devices()
    gpus = [d for d in devs if d.type == C.GGML_BACKEND_DEVICE_TYPE_GPU]
    chosen = None
    host_of_gpu = wanted in ("cuda_host", "gpu_host") or wanted.startswith(("cuda_host:", "gpu_host:"))
    if host_of_gpu:
        # Pinned host memory of a GPU: weights stay in RAM but transfer to that GPU fast (op offload).
        wanted = "gpu" + wanted[wanted.index(":"):] if ":" in wanted else "gpu"
    if wanted == "cpu":
        chosen = next((d for d in devs if d.type == C.GGML_BACKEND_DEVICE_TYPE_CPU), None)
    elif wanted == "gpu" or wanted.startswith("gpu:"):
        index = 0 if wanted == "gpu" else int(wanted[4:]) if wanted[4:].isdigit() else -1
        if not 0 <= index < len(gpus):
            raise DeviceNotFoundError(f"placement target {target!r}: this machine has {len(gpus)} GPU(s); "
                                      "install a GPU plugin or target 'cpu'")
        chosen = gpus[index]
    if chosen is not None:
        buft = chosen.host_buffer_type() if host_of_gpu else chosen.buffer_type()
        if buft == ffi.NULL:
            raise DeviceNotFoundError(f"placement target {target!r}: {chosen.name} has no pinned host memory "
                                      "buffer type")
        return buft, c_string(C.ggml_backend_buft_name(buft))
    known = []
    for dev in devs:
        for buft in (dev.buffer_type(), dev.host_buffer_type()):
            if buft == ffi.NULL:
                continue
            name = c_string(C.ggml_backend_buft_name(buft))
            known.append(name)
            if wanted in (name.lower(), dev.name.lower()):
                return buft, name
    raise DeviceNotFoundError(f"placement target {target!r} is not a device or buffer type of this machine; "
                              f"use 'cpu', 'gpu', 'gpu:N' or one of: {', '.join(dict.fromkeys(known))}")


def add_rpc_server(endpoint: str, timeout: float = 3.0) -> list[Device]:
    """Add the devices of an RPC server ("host:port", started with `llmplace-rpc-server`).

    The server is first spoken to from Python, with a timeout (see llmplace.rpc): llama.cpp aborts the whole
    process when it cannot reach a server or the server answers wrongly, and waits forever for one that never
    answers."""
    host, port = rpc.parse_endpoint(endpoint)
    with _lock:
        if endpoint in _rpc_devices:
            return list(_rpc_devices[endpoint])
    rpc.probe(host, port, timeout)
    ensure_initialized()
    with _lock:
        if endpoint in _rpc_devices:
            return list(_rpc_devices[endpoint])
        devs = _register_rpc_server(endpoint)
        _rpc_devices[endpoint] = devs
        return list(devs)


def registered_rpc_endpoints() -> list[str]:
    """The RPC servers added so far ("host:port"), in the order they were added."""
    with _lock:
        return list(_rpc_devices)


def _register_rpc_server(endpoint: str) -> list[Device]:
    before = len(native_devices())
    reg = C.ggml_backend_reg_by_name(b"RPC")
    add = C.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg != ffi.NULL else ffi.NULL
    if add == ffi.NULL:
        raise BuildError("the RPC backend is not loaded (see llmplace.backend_modules())")
    server_reg = ffi.cast("ggml_backend_reg_t (*)(const char *)", add)(endpoint.encode())
    if server_reg == ffi.NULL:
        raise DeviceNotFoundError(f"the RPC server at {endpoint} did not answer as an llmplace/llama.cpp RPC server")
    C.ggml_backend_register(server_reg)  # its devices join the global device list, as llama.cpp's --rpc does
    return [_device(d) for d in native_devices()[before:]]


def backend_modules() -> list[BackendModule]:
    """Every backend module llmplace found and whether it loaded."""
    ensure_initialized()
    return list(_modules)


def _host_available(free: int, total: int) -> int:
    """The CPU backend reports all of the host's RAM as free; Linux's MemAvailable (what can be allocated
    without swapping, page cache included) is the honest figure. Elsewhere ggml's value stays."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return min(total, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return free


def _device(dev: NativeDevice) -> Device:
    free, total = dev.memory()
    host = dev.host_buffer_type()
    return Device(
        index=dev.index,
        name=dev.name,
        description=dev.description,
        kind=dev.kind,
        backend=dev.backend,
        memory_free=_host_available(free, total) if dev.kind == "cpu" else free,
        memory_total=total,
        buffer_type=c_string(C.ggml_backend_buft_name(dev.buffer_type())),
        host_buffer_type=c_string(C.ggml_backend_buft_name(host)) if host != ffi.NULL else None,
    )


def devices() -> list[Device]:
    """The devices llama.cpp sees now, in ggml's order (free memory is read at each call)."""
    return [_device(d) for d in native_devices()]


def device(name: str) -> Device:
    """The device called `name` (case-insensitive), or DeviceNotFoundError listing those that exist."""
    found = [d for d in devices() if d.name.lower() == name.lower()]
    if not found:
        names = ", ".join(d.name for d in devices())
        raise DeviceNotFoundError(f"no device named {name!r}; this machine has: {names}")
    return found[0]
