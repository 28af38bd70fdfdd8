"""The low-level names of llama-cpp-python's `llama_cpp.llama_cpp` that high-level code commonly uses.

Enum constants come from the pinned llama.h itself (through the compiled binding), so their values are the
ones this build's llama.cpp uses. Functions that would hand out raw C pointers are not provided: llmplace's
classes own every native handle.
"""

from __future__ import annotations

from .._ffi import C, ffi
from ..backends import ensure_initialized

# The enums and #defines of llama.h / ggml.h that llama-cpp-python exports (what cffi compiles in, so the values
# are this build's).
_ENUM_PREFIXES = ("LLAMA_SPLIT_MODE_", "LLAMA_POOLING_TYPE_", "LLAMA_ROPE_SCALING_TYPE_", "LLAMA_ATTENTION_TYPE_",
                  "LLAMA_VOCAB_TYPE_", "LLAMA_FTYPE_", "LLAMA_FLASH_ATTN_TYPE_", "LLAMA_TOKEN_ATTR_",
                  "GGML_TYPE_", "GGML_NUMA_STRATEGY_", "LLAMA_ROPE_TYPE_", "LLAMA_TOKEN_TYPE_",
                  "LLAMA_KV_OVERRIDE_TYPE_", "LLAMA_LOAD_MODE_", "LLAMA_LAZY_MODE_", "LLAMA_CONTEXT_TYPE_",
                  "LLAMA_MODEL_META_KEY_", "LLAMA_PROCESS_TYPE_", "LLAMA_STATE_SEQ_", "LLAMA_SESSION_",
                  "LLAMA_FILE_MAGIC_", "GGML_ROPE_TYPE_")

__all__ = [
    "LLAMA_DEFAULT_SEED",
    "LLAMA_MAX_DEVICES",
    "LLAMA_SESSION_MAGIC",
    "LLAMA_STATE_SEQ_MAGIC",
    "LLAMA_TOKEN_NULL",
    "llama_max_devices",
    "llama_print_system_info",
    "llama_supports_gpu_offload",
    "llama_supports_mlock",
    "llama_supports_mmap",
    "llama_supports_rpc",
    "llama_time_us",
]

for _name in dir(C):
    if _name.startswith(_ENUM_PREFIXES):
        globals()[_name] = getattr(C, _name)
        __all__.append(_name)

# #defines are not part of the compiled binding; these two are fixed by llama.h's ABI.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_TOKEN_NULL = -1
LLAMA_MAX_DEVICES = C.llama_max_devices()
# Defined in llama.h as other macros (LLAMA_FILE_MAGIC_GGSN / _GGSQ), which cffi does not evaluate.
LLAMA_SESSION_MAGIC = C.LLAMA_FILE_MAGIC_GGSN
LLAMA_STATE_SEQ_MAGIC = C.LLAMA_FILE_MAGIC_GGSQ


def llama_max_devices() -> int:
    return C.llama_max_devices()


def llama_supports_gpu_offload() -> bool:
    """Whether a GPU (or RPC) backend is loaded that layers can be offloaded to."""
    ensure_initialized()  # backends are loaded from llmplace's folder first; before that the answer is always no
    return bool(C.llama_supports_gpu_offload())


def llama_supports_mmap() -> bool:
    return bool(C.llama_supports_mmap())


def llama_supports_mlock() -> bool:
    return bool(C.llama_supports_mlock())


def llama_supports_rpc() -> bool:
    ensure_initialized()
    return bool(C.llama_supports_rpc())


def llama_print_system_info() -> bytes:
    """llama.cpp's one-line summary of CPU features and backends, as bytes (llama-cpp-python returns bytes)."""
    ensure_initialized()
    return ffi.string(C.llama_print_system_info())


def llama_time_us() -> int:
    return int(C.llama_time_us())
