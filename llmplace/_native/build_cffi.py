"""Generate llmplace's cffi module source from the real llama.cpp headers (run by CMake at build time).

1. Preprocess llama.h + ggml-backend.h + mtmd.h + mtmd-helper.h (libmtmd: images through a projector) +
   llmplace_shim.h with the C compiler, keeping line markers.
2. Keep only declarations that come from those headers (not libc's), with compiler extensions removed.
3. Drop function declarations that no built library exports (a declared-but-missing function would fail
   at import with "undefined symbol"), and replace array sizes that are expressions with cffi's `...`.
4. Emit the out-of-line API-mode C source. It is compiled against the same headers, so the C compiler
   checks every declared struct field and function signature: a layout drift is a build error (or an
   import-time "wrong offset" error from cffi), never a silent misread.

Usage: build_cffi.py --cc CC --include DIR... --library LIB... --cdef-out FILE --c-out FILE
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import cffi
import pycparser
from pycparser import c_ast, c_generator

HEADERS = ("llama.h", "ggml-backend.h", "mtmd.h", "mtmd-helper.h", "llmplace_shim.h")
# Headers whose declarations become cdefs: llama.cpp's, ggml's and libmtmd's public headers, and the shim's.
KEPT_HEADER = re.compile(r"(^|/)(llama[^/]*|ggml[^/]*|mtmd|mtmd-helper|llmplace_shim)\.h$")
# GCC extensions pycparser cannot read; they carry no layout information.
EXTENSION_DEFINES = [
    "-D__attribute__(x)=", "-D__extension__=", "-D__asm__(x)=", "-D__restrict=", "-D__inline=",
    "-D__restrict__=", "-D__inline__=", "-D__THROW=", "-D__nonnull(x)=",
]
# Callbacks implemented in Python (cffi "extern Python"): load progress and log. (The abort callback,
# called at every graph node, is the shim's C function llmplace_abort_if_flag_set.)
PYTHON_CALLBACKS = """
extern "Python" _Bool _llmplace_progress_callback(float progress, void * user_data);
extern "Python" void _llmplace_log_callback(enum ggml_log_level level, const char * text, void * user_data);
"""


def preprocess(cc: str, include_dirs: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = os.path.join(tmp, "all.h")
        with open(wrapper, "w") as f:
            f.writelines(f'#include "{h}"\n' for h in HEADERS)
        cmd = [cc, "-E", "-std=c11", *EXTENSION_DEFINES, *(f"-I{d}" for d in include_dirs), wrapper]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def integer_macros(cc: str, include_dirs: list[str]) -> str:
    """`#define NAME ...` lines for llama.cpp's and ggml's integer constants (LLAMA_TOKEN_NULL, GGML_MAX_DIMS ...):
    cffi takes each value from the compiler, so the numbers are never copied by hand."""
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = os.path.join(tmp, "all.h")
        with open(wrapper, "w") as f:
            f.writelines(f'#include "{h}"\n' for h in HEADERS)
        cmd = [cc, "-E", "-dM", "-std=c11", *(f"-I{d}" for d in include_dirs), wrapper]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    integer = re.compile(r"^#define ((?:LLAMA|GGML)_[A-Z0-9_]+) \(?-?(?:0x[0-9a-fA-F]+|\d+)[uUlL]*\)?$")
    names = sorted(m.group(1) for m in map(integer.match, out.splitlines()) if m)
    return "".join(f"#define {name} ...\n" for name in names)


def keep_own_declarations(preprocessed: str) -> str:
    kept, keep = [], False
    marker = re.compile(r'^# \d+ "([^"]+)"')
    for line in preprocessed.splitlines():
        m = marker.match(line)
        if m:
            keep = bool(KEPT_HEADER.search(m.group(1)))
            continue
        if keep and line.strip():
            kept.append(line)
    return "\n".join(kept) + "\n"


def exported_symbols(libraries: list[str]) -> set[str]:
    names: set[str] = set()
    for lib in libraries:
        out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True, capture_output=True, text=True)
        names.update(line.split()[-1] for line in out.stdout.splitlines() if line.strip())
    return names


class _ArraySizeToEllipsis(c_ast.NodeVisitor):
    """Array sizes that are expressions (`[64 / sizeof(int32_t)]`) become cffi's `[...]`, which means
    "ask the C compiler"; plain integer sizes stay and are checked by the compiler."""

    def visit_ArrayDecl(self, node: c_ast.ArrayDecl) -> None:
        if node.dim is not None and not isinstance(node.dim, c_ast.Constant):
            node.dim = c_ast.ID("__dotdotdot__")
        self.generic_visit(node)


# Names cffi knows but pycparser does not, made parseable by placeholder typedefs (not emitted).
_PRELUDE = "typedef int size_t; typedef int FILE; typedef int va_list;\n" + "".join(
    f"typedef int {t};\n" for t in (
        "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t", "uint64_t",
        "intptr_t", "uintptr_t", "ptrdiff_t"))


def to_cdef(declarations: str, keep_function) -> tuple[str, list[str]]:
    """Return the cdef text and the names of the functions `keep_function(name)` rejected."""
    ast = pycparser.CParser().parse(_PRELUDE + declarations, filename="<llama headers>")
    generator = c_generator.CGenerator()
    n_prelude = _PRELUDE.count("\n")
    out, dropped, seen_typedefs = [], [], set()
    for index, node in enumerate(ast.ext):
        if index < n_prelude:
            continue
        if isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl) and not keep_function(node.name):
            dropped.append(node.name)
            continue
        _ArraySizeToEllipsis().visit(node)
        text = generator.visit(node).replace("__dotdotdot__", "...") + ";"
        # C11 allows repeating an identical typedef (ggml-alloc.h and ggml-backend.h both declare
        # ggml_backend_buffer_type_t); cffi does not.
        if isinstance(node, c_ast.Typedef) and text in seen_typedefs:
            continue
        seen_typedefs.add(text)
        out.append(text)
    return "\n".join(out) + "\n", dropped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cc", required=True)
    parser.add_argument("--include", action="append", default=[])
    parser.add_argument("--library", action="append", default=[])
    parser.add_argument("--cdef-out", required=True)
    parser.add_argument("--c-out", required=True)
    args = parser.parse_args()

    declarations = keep_own_declarations(preprocess(args.cc, args.include))
    exported = exported_symbols(args.library)
    cdef, dropped = to_cdef(declarations, exported.__contains__)
    cdef += integer_macros(args.cc, args.include) + PYTHON_CALLBACKS
    if dropped:
        print(f"build_cffi: {len(dropped)} declared functions not exported, left out: {', '.join(sorted(dropped))}",
              file=sys.stderr)

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("llmplace._llmplace_cffi", "".join(f'#include "{h}"\n' for h in HEADERS))
    write_if_changed(args.cdef_out, cdef)
    # Write the C file only when it changes, so that Ninja (restat) skips recompiling the module.
    with tempfile.TemporaryDirectory() as tmp:
        emitted = os.path.join(tmp, "module.c")
        ffi.emit_c_code(emitted)
        with open(emitted) as f:
            write_if_changed(args.c_out, f.read())


def write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
