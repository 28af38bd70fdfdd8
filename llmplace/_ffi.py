"""The only module that imports the compiled cffi extension; everything native goes through here.

`ffi` and `C` are the cffi objects (`C` holds llama.cpp's, ggml's and the shim's functions).
`LIB_DIR` is the folder of llmplace's shared libraries and backend modules, `BIN_DIR` that of the
programs built from the same source (the RPC server, llama-bench, llama-simple).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import BuildError

try:
    from . import _llmplace_cffi
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise BuildError(
        f"llmplace's compiled module could not be imported ({exc}). If you are in a source checkout, its "
        "llmplace/ folder hides the installed package: run from another folder, or install with "
        "`pip install -e .`. Otherwise reinstall: `pip install --force-reinstall --no-cache-dir llmplace` "
        "(building needs a C/C++ compiler and CMake).") from exc

ffi = _llmplace_cffi.ffi
C = _llmplace_cffi.lib

# In an editable install the Python files live in the checkout while compiled files live in
# site-packages: locate the libraries from the compiled module, not from this file.
PACKAGE_NATIVE_DIR = Path(_llmplace_cffi.__file__).resolve().parent
LIB_DIR = PACKAGE_NATIVE_DIR / "lib"
# The programs find backend modules the way ggml does by default (their own folder, then the current
# directory): run them with cwd=LIB_DIR.
BIN_DIR = PACKAGE_NATIVE_DIR / "bin"


def c_string(value: "ffi.CData") -> str:
    """Decode a NUL-terminated C string (NULL → empty string); invalid UTF-8 is replaced, not raised."""
    if value == ffi.NULL:
        return ""
    return ffi.string(value).decode("utf-8", errors="replace")


def read_c_string_into_buffer(fill, initial_size: int = 256) -> str:
    """Call `fill(buf, size)`, a llama.cpp-style function that returns the length it needs, growing the
    buffer once when the first one was too small."""
    size = initial_size
    for _ in range(2):
        buf = ffi.new("char[]", size)
        n = fill(buf, size)
        if n < 0:
            return ""
        if n < size:
            return ffi.unpack(buf, n).decode("utf-8", errors="replace")
        size = n + 1
    return ffi.unpack(buf, size - 1).decode("utf-8", errors="replace")


def null_terminated(ctype: str, items: Sequence) -> "ffi.CData":
    """A C array of `ctype` holding `items` and then one zeroed element: llama.cpp's NULL-terminated lists (devices,
    tensor buffer type overrides). An item is a value of `ctype` (a pointer) or, for a struct, a dict of its fields.
    The caller keeps the array (and what its items point to) alive while llama.cpp reads it."""
    array = ffi.new(f"{ctype}[]", len(items) + 1)  # ffi.new zeroes memory: the last element is the terminator
    for i, item in enumerate(items):
        array[i] = item
    return array
