"""`install()`: let third-party code that does `import llama_cpp` get llmplace's compatibility layer.

Opt-in and in-process only: it registers module aliases in `sys.modules`, it never installs a `llama_cpp`
package on disk, so pip and other environments see nothing.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import InvalidParameterError

# llama_cpp's submodule → llmplace.compat's module standing in for it
ALIASES = {
    "llama_cpp": "llmplace.compat",
    "llama_cpp.llama": "llmplace.compat.llama",
    "llama_cpp.llama_cpp": "llmplace.compat.llama_cpp",
    "llama_cpp.llama_types": "llmplace.compat.llama_types",
    "llama_cpp.llama_speculative": "llmplace.compat.llama_speculative",
    "llama_cpp.llama_chat_format": "llmplace.compat.llama_chat_format",
    "llama_cpp.llama_grammar": "llmplace.compat.llama_grammar",
    "llama_cpp.llama_cache": "llmplace.compat.llama_cache",
    "llama_cpp.llama_tokenizer": "llmplace.compat.llama_tokenizer",
}


def install(*, replace: bool = False) -> None:
    """Make `import llama_cpp` (and its submodules llama, llama_cpp, llama_types, llama_speculative,
    llama_chat_format, llama_grammar, llama_cache, llama_tokenizer) import llmplace's compatibility layer in
    this process. Call it before the code that imports llama_cpp.

    If the real llama-cpp-python is already imported, this raises, since objects already made by it would
    mix with llmplace's; replace=True installs anyway (modules that imported it keep their reference)."""
    current = sys.modules.get("llama_cpp")
    if current is not None and getattr(current, "__name__", "") != "llmplace.compat" and not replace:
        raise InvalidParameterError("llama_cpp (llama-cpp-python) is already imported in this process; call "
                                    "llmplace.compat.install() before anything imports it, or pass replace=True")
    for alias, target in ALIASES.items():
        sys.modules[alias] = importlib.import_module(target)


def uninstall() -> None:
    """Remove the aliases install() registered (a later `import llama_cpp` finds the real package, if any)."""
    for alias, target in ALIASES.items():
        module = sys.modules.get(alias)
        if module is not None and getattr(module, "__name__", "") == target:
            del sys.modules[alias]
