"""The only module that imports the compiled cffi extension; everything native goes through here.

`ffi` and `C` are the cffi objects (`C` holds llama.cpp's, ggml's and the shim's functions).
`LIB_DIR` is the folder of llmplace's shared libraries and backend modules, `BIN_DIR` that of the
programs built from the same source (the RPC server, llama-bench, llama-simple).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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

# A cffi pointer, array or struct (what `ffi.new`, `ffi.cast` and `C`'s functions return). cffi checks these at
# run time and mypy cannot see their C types: they are Any here, and annotations name them CData.
CData = Any


def c_string(value: CData) -> str:
    """Decode a NUL-terminated C string (NULL → empty string); invalid UTF-8 is replaced, not raised."""
    if value == ffi.NULL:
        return ""
    text: str = ffi.string(value).decode("utf-8", errors="replace")
    return text


def read_c_string_into_buffer(fill: Callable[[CData, int], int], initial_size: int = 256) -> str:
    """Call `fill(buf, size)`, a llama.cpp-style function that returns the length it needs, growing the
    buffer once when the first one was too small."""
    size = initial_size
    for _ in range(2):
        buf = ffi.new("char[]", size)
        n = fill(buf, size)
        if n < 0:
            return ""
        if n < size:
            return str(ffi.unpack(buf, n).decode("utf-8", errors="replace"))
        size = n + 1
    return str(ffi.unpack(buf, size - 1).decode("utf-8", errors="replace"))


def null_terminated(ctype: str, items: Sequence[Any]) -> CData:
    """A C array of `ctype` holding `items` and then one zeroed element: llama.cpp's NULL-terminated lists (devices,
    tensor buffer type overrides). An item is a value of `ctype` (a pointer) or, for a struct, a dict of its fields.
    The caller keeps the array (and what its items point to) alive while llama.cpp reads it."""
    array = ffi.new(f"{ctype}[]", len(items) + 1)  # ffi.new zeroes memory: the last element is the terminator
    for i, item in enumerate(items):
        array[i] = item
    return array


# Backend modules are loaded at run time (GGML_BACKEND_DL): the compiled module declares none of their functions
# (DESIGN §4), and a few are not offered through ggml_backend_reg_get_proc_address either (a CPU variant's
# ggml_backend_score, the CPU backend's ggml_threadpool_pause). They are found as ggml finds them, with dlopen and
# dlsym, called through a second, tiny cffi FFI in ABI mode; the address is then cast to the real signature on
# `ffi`, so calls are typed by the compiled module's own declarations.
_dl: SimpleNamespace | None = None
_dl_ffi: Any = None  # a cffi.FFI, made at the first use
_dl_lock = threading.Lock()


def _dynamic_loader() -> SimpleNamespace:
    global _dl, _dl_ffi
    with _dl_lock:
        if _dl is None:
            import cffi

            _dl_ffi = cffi.FFI()
            _dl_ffi.cdef("void *dlopen(const char *, int); void *dlsym(void *, const char *); char *dlerror(void);"
                         "int dlclose(void *);")
            lib = _dl_ffi.dlopen(None)  # the process's own symbols: the C library's dynamic loader functions
            # Resolved now: cffi looks a function up at its first use, and that dlsym would clear the message
            # dlerror is about to report.
            _dl = SimpleNamespace(**{name: getattr(lib, name) for name in ("dlopen", "dlsym", "dlerror", "dlclose")})
    return _dl


class SharedLibrary:
    """A shared library opened with dlopen (RTLD_NOW | RTLD_LOCAL), for functions the compiled module does not
    declare. `already_loaded=True` opens only a copy already in the process (RTLD_NOLOAD), never a second one.

    Raises OSError with the dynamic loader's message when the library does not load. `close()` (or `with`)
    releases this handle; a function taken from it must not be called after that unless the library is loaded
    elsewhere too (as ggml keeps the backend modules it loaded)."""

    def __init__(self, path: str | os.PathLike[str], *, already_loaded: bool = False) -> None:
        dl = _dynamic_loader()
        self.path = Path(path)
        flags = os.RTLD_NOW | os.RTLD_LOCAL | (os.RTLD_NOLOAD if already_loaded else 0)
        self._handle = dl.dlopen(os.fsencode(self.path), flags)
        if self._handle == _dl_ffi.NULL:
            reason = dl.dlerror()
            raise OSError(_dl_ffi.string(reason).decode("utf-8", "replace") if reason != _dl_ffi.NULL
                          else f"{self.path}: not loaded")

    def function(self, name: str, signature: str) -> CData | None:
        """The library's function `name` as a function pointer of `signature` (a type of `ffi`, e.g.
        "int (*)(void)"), or None when the library does not export it."""
        if self._handle is None:
            raise ValueError(f"{self.path} is closed")
        address = _dynamic_loader().dlsym(self._handle, name.encode())
        if address == _dl_ffi.NULL:
            return None
        return ffi.cast(signature, int(_dl_ffi.cast("uintptr_t", address)))

    def close(self) -> None:
        if self._handle is not None:
            _dynamic_loader().dlclose(self._handle)
            self._handle = None

    def __enter__(self) -> SharedLibrary:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
