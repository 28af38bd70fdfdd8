"""llama-cpp-python, the reference of the differential tests, as it can run on this machine.

Built from source by `pip install ".[test]"`, llama-cpp-python compiles llama.cpp for the host CPU (GGML_NATIVE).
On a CPU with AMX (seen here on 2026-12-02: an Intel Xeon with amx_int8 / amx_tile under a Firecracker VM) its
build routes quantized matrix products through the AMX extra buffer type, and ggml_backend_amx_mul_mat crashes
the process (SIGSEGV) on SmolLM2's Q4_1 weights at the first decode. llmplace's own build is x86-64-v3 and never
takes that path. The reference is therefore loaded with llama.cpp's extra buffer types (AMX, CPU repacking)
turned off, which llama-cpp-python's Llama does not expose as an argument: its llama_model_default_params() is
wrapped while the model loads. The arithmetic of the weights' own type is what both libraries then run."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _no_extra_buffer_types():
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def reference_llama(*args, **kwargs):
    """llama_cpp.Llama(*args, **kwargs), without extra buffer types (see the module's docstring)."""
    import llama_cpp

    with _no_extra_buffer_types():
        return llama_cpp.Llama(*args, **kwargs)


# The same, as source for scripts run in a subprocess (tests/test_build.py).
SCRIPT_PRELUDE = """
import llama_cpp.llama_cpp as _low
_original_params = _low.llama_model_default_params
def _params():
    p = _original_params()
    p.use_extra_bufts = False  # AMX crashes on some CPUs: tests/reference.py
    return p
_low.llama_model_default_params = _params
"""
