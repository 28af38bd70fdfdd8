"""Backends load from llmplace's own folders and the device list describes them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import llmplace
from llmplace._ffi import LIB_DIR


def test_cpu_device_is_listed_with_memory_and_buffer_types():
    devices = llmplace.devices()
    cpu = [d for d in devices if d.kind == "cpu"]
    assert len(cpu) == 1
    assert cpu[0].name == "CPU"
    assert cpu[0].buffer_type == "CPU"
    assert cpu[0].memory_total > 1 << 30
    assert 0 < cpu[0].memory_free <= cpu[0].memory_total
    assert all(d.kind in {"cpu", "gpu", "igpu", "accel", "rpc", "meta"} for d in devices)


def test_backend_modules_come_from_the_package_folder_and_all_load():
    from llmplace.backends import backend_dirs

    modules = llmplace.backend_modules()
    names = {m.name for m in modules}
    assert {"cpu", "rpc"} <= names
    for m in modules:
        assert m.loaded, f"{m.path}: {m.error}"
        # the base's own modules from its folder; a GPU plugin's (CI installs llmplace-vulkan) from its package's
        assert m.path.parent == LIB_DIR if m.name in ("cpu", "rpc") else m.path.parent in backend_dirs()[1:]


def test_device_lookup_by_name():
    device = llmplace.device
    assert device("cpu").name == "CPU"
    try:
        device("CUDA7")
    except llmplace.DeviceNotFoundError as exc:
        assert "CPU" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected DeviceNotFoundError")


def test_a_backend_module_that_fails_to_load_is_reported(tmp_path):
    from llmplace.backends import _load_from

    broken = tmp_path / "libggml-broken.so"
    broken.write_bytes(b"\x7fELF this is not really a shared library")
    (result,) = _load_from(tmp_path)
    assert result.name == "broken" and not result.loaded
    assert result.error  # the dynamic loader's reason
    assert str(broken) in result.error and "load_backend" not in result.error  # its message, not ggml's prefix
    assert any(d.name == "CPU" for d in llmplace.devices())  # nothing else was disturbed


@pytest.mark.parametrize("runtime, hint", [
    ("libcudart.so.99", "the CUDA 99 runtime (libcudart) is not installed"),
    ("libcublasLt.so.99", "the CUDA 99 runtime (libcublasLt) is not installed"),
])
def test_a_gpu_module_whose_runtime_is_missing_says_what_to_install(tmp_path, runtime, hint):
    # A real module file that needs a library absent here, as the CUDA plugin needs libcudart.so.12 on a machine
    # without the CUDA 12 runtime: linked against a stand-in that is then removed.
    from llmplace.backends import _load_from

    stand_in = tmp_path / "stand-in" / runtime
    stand_in.parent.mkdir()
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler builds llmplace, so one is here"
    (tmp_path / "empty.c").write_text("int placeholder(void) { return 0; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(stand_in), str(tmp_path / "empty.c"),
                    f"-Wl,-soname,{runtime}"], check=True)
    modules = tmp_path / "modules"
    modules.mkdir()
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(modules / "libggml-fakegpu.so"), str(tmp_path / "empty.c"),
                    "-Wl,--no-as-needed", str(stand_in)], check=True)
    stand_in.unlink()
    (result,) = _load_from(modules)
    assert not result.loaded
    assert f"{runtime}: cannot open" in result.error and hint in result.error
    assert "LD_LIBRARY_PATH" in result.error and "llmplace[cuda12]" in result.error


def test_a_plugin_built_from_another_llama_cpp_is_refused_with_the_fix(tmp_path):
    from llmplace._build_info import LLAMA_CPP_COMMIT
    from llmplace.backends import plugin_mismatch

    plugin = tmp_path / "llmplace_cuda13"
    plugin.mkdir()
    assert "no _build_info.py" in plugin_mismatch(plugin)
    (plugin / "_build_info.py").write_text(f'LLAMA_CPP_COMMIT = "{LLAMA_CPP_COMMIT}"\n'
                                           f'LLMPLACE_VERSION = "{llmplace.__version__}"\n')
    assert plugin_mismatch(plugin) is None
    (plugin / "_build_info.py").write_text('LLAMA_CPP_COMMIT = "0123456789abcdef"\nLLMPLACE_VERSION = "0.0.1"\n')
    message = plugin_mismatch(plugin)
    assert "0123456789" in message and f"pip install 'llmplace-cuda13=={llmplace.__version__}'" in message


def test_a_cpu_variant_is_scored_by_its_own_ggml_backend_score():
    from llmplace.backends import _variant_score

    cpu = next(m for m in llmplace.backend_modules() if m.name == "cpu")
    assert _variant_score(cpu.path) > 0  # the variant this machine loaded runs here
    assert _variant_score(LIB_DIR / "libggml-no-such-variant.so") == 0


def test_cpu_threadpool_pause_pauses_a_real_pool():
    from llmplace._ffi import C, ffi
    from llmplace.backends import cpu_backend_function, cpu_threadpool_pause

    pause = cpu_threadpool_pause()
    assert pause is not None and pause is cpu_threadpool_pause()  # looked up once
    new = cpu_backend_function("ggml_threadpool_new", "struct ggml_threadpool *(*)(struct ggml_threadpool_params *)")
    free = cpu_backend_function("ggml_threadpool_free", "void (*)(struct ggml_threadpool *)")
    pool = new(ffi.new("struct ggml_threadpool_params *", C.ggml_threadpool_params_default(2)))
    assert pool != ffi.NULL
    pause(pool)
    free(pool)
