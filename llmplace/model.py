"""Model: load a GGUF file, read its metadata, own the native handle.

`llmplace.load` (planning.py) builds one; with fit=True it first plans where everything goes, which needs dry-run
Models: planning sits above this module, which imports nothing of it."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from . import logs
from ._ffi import C, CData, c_string, ffi, read_c_string_into_buffer
from ._handle import NativeObject
from .backends import add_rpc_server, buffer_type, ensure_initialized
from .c_values import INT32, integer
from .errors import AbortedError, InvalidParameterError, ModelLoadError
from .gguf_info import check_header
from .gguf_info import read as read_gguf
from .lora import LoRA
from .native_errors import native_call
from .placement import Placement, PlacementSpec, TensorPlacement, configure, describe, is_host_buffer, read_back
from .progress import ProgressCallback, ProgressRelay, resolve
from .vocab import Vocab

# llama.cpp's loader is not safe to enter from two threads at once for the same process-wide state (the
# backend registry; the log capture is per thread, see logs.py); loads are rare and long, so they are serialized.
_load_lock = threading.Lock()
_Result = TypeVar("_Result")


_KEY_BYTES = 128  # llama_model_kv_override: char key[128] and char val_str[128], NUL included
_INT64 = range(-(1 << 63), 1 << 63)


def kv_override_array(overrides: Mapping[str, bool | int | float | str], metadata: Mapping[str, object] | None = None
                      ) -> CData:
    """GGUF metadata overrides as llama.cpp's NULL-key-terminated llama_model_kv_override array.

    The value's Python type picks the override's type (bool, int, float, str), as llama-cpp-python does. For a key
    the file has (`metadata`), the types must agree: llama.cpp would only log a warning and keep the file's value."""
    if not isinstance(overrides, Mapping):
        raise InvalidParameterError(f"kv_overrides must be a dict of GGUF key -> bool, int, float or str, "
                                    f"not {type(overrides).__name__}")
    array = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)  # zeroed: the last key is empty
    for item, (key, value) in zip(array, overrides.items()):
        if not isinstance(key, str) or not key or len(key.encode()) >= _KEY_BYTES:
            raise InvalidParameterError(f"kv_overrides key {key!r} must be a GGUF key name of 1 to "
                                        f"{_KEY_BYTES - 1} bytes, e.g. 'llama.context_length'")
        item.key = key.encode()
        if metadata is not None and key in metadata:
            have = metadata[key]
            kind = bool if isinstance(have, bool) else int if isinstance(have, int) else type(have)
            given = bool if isinstance(value, bool) else int if isinstance(value, int) else type(value)
            if kind is not given and not (kind is float and given is int):
                raise InvalidParameterError(f"kv_overrides[{key!r}] = {value!r} is of type {given.__name__}, but the "
                                            f"file's {key} is of type {kind.__name__} ({have!r}): give a value "
                                            f"of type {kind.__name__}")
            if kind is float:
                value = float(value)
        if isinstance(value, bool):
            item.tag, item.val_bool = C.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int) and value in _INT64:
            item.tag, item.val_i64 = C.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            item.tag, item.val_f64 = C.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str) and len(value.encode()) < _KEY_BYTES:
            item.tag, item.val_str = C.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()
        else:
            raise InvalidParameterError(f"kv_overrides[{key!r}] = {value!r}: a value must be a bool, a 64-bit int, "
                                        f"a float or a str under {_KEY_BYTES} bytes")
    if metadata is not None:
        check_override_values(overrides, metadata)
    return array


# Overrides llama.cpp takes but cannot survive: the architecture picks which tensors and keys exist, and a
# tokenizer model that disagrees with the file's vocabulary arrays throws through C (the process aborts).
_FIXED_KEYS = ("general.architecture", "tokenizer.ggml.model")
# Keys that describe the shapes of the weights: another value either fails the load or passes it and fails a
# GGML_ASSERT in the graph (rope.dimension_count: "n_embd_head == n_rot"), or divides by zero (head_count 0).
_SHAPE_KEYS = ("embedding_length", "feed_forward_length", "expert_feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
               "rope.dimension_count_swa", "attention.key_length_swa", "attention.value_length_swa", "vocab_size")


def check_override_values(overrides: Mapping[str, bool | int | float | str], metadata: Mapping[str, object]) -> None:
    """Refuse overrides whose values llama.cpp would assert or divide by zero on: the file validator's own
    rules (gguf_validate) applied to the file's values with the overrides in place, since llama.cpp reads an
    override instead of the file's value, past the validator."""
    from . import gguf_validate

    for key in _FIXED_KEYS:
        if key in overrides and overrides[key] != metadata.get(key):
            raise InvalidParameterError(f"kv_overrides cannot change {key} (the file has {metadata.get(key)!r}): "
                                        "the weights and vocabulary were made for it")
    arch = str(metadata.get("general.architecture", ""))
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        name = key[len(arch) + 1:] if key.startswith(arch + ".") else None
        have = metadata.get(key)
        if name in _SHAPE_KEYS and value != have:
            raise InvalidParameterError(f"kv_overrides[{key!r}] = {value}: {name} describes the shape of the "
                                        f"weights (the file has {have!r}) and cannot be overridden")
        if value < 0 and not (isinstance(have, int) and have < 0):
            # llama.cpp stores most integer keys as uint32: a negative value wraps to about 4 billion
            raise InvalidParameterError(f"kv_overrides[{key!r}] = {value}: GGUF sizes and counts are unsigned; "
                                        "give a value >= 0")
    # The validator's view of the key/values: strings as bytes, arrays as ("array", element type, length, offset).
    values: dict[str, Any] = {}
    merged: dict[str, object] = {**metadata, **overrides}
    for key, item in merged.items():
        if isinstance(item, str):
            values[key] = item.encode()
        elif isinstance(item, (list, tuple)):
            values[key] = ("array", None, len(item), 0)
        else:
            values[key] = item
    try:
        gguf_validate._check_vocab_arrays(values)
        gguf_validate._check_hparams(values, {})
    except gguf_validate._Bad as bad:
        raise InvalidParameterError(f"kv_overrides make the model invalid: {bad}") from None


def rpc_endpoints(rpc_servers: str | Sequence[str] | None) -> list[str]:
    """rpc_servers as a list: a list of "host:port", or one string of them separated by commas (llama.cpp's
    --rpc and llama-cpp-python take that form). Each is checked by add_rpc_server."""
    if rpc_servers is None:
        return []
    if isinstance(rpc_servers, str):
        return [part.strip() for part in rpc_servers.split(",") if part.strip()]
    if not isinstance(rpc_servers, (list, tuple)):
        raise InvalidParameterError(f"rpc_servers must be a list of 'host:port' strings, not {rpc_servers!r}")
    return list(rpc_servers)


class Model(NativeObject):
    """A loaded model. Create with `llmplace.load(path)`; use as a context manager or call `close()`."""

    _closed_message = "this Model is closed; load it again with llmplace.load(path)"

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = -1, split_mode: str = "layer",
                 main_gpu: int = 0, use_mmap: bool = True, use_mlock: bool = False, vocab_only: bool = False,
                 check_tensors: bool = False, progress: bool | ProgressCallback | None = None,
                 placement: PlacementSpec = None, tensor_split: Sequence[float] | None = None, split_by: str = "bytes",
                 devices: Sequence[str] | None = None, rpc_servers: str | Sequence[str] | None = None,
                 kv_overrides: Mapping[str, bool | int | float | str] | None = None, dry_run: bool = False) -> None:
        self.path = Path(os.fspath(path)).expanduser()
        n_gpu_layers = integer("n_gpu_layers", n_gpu_layers, -1, INT32[1], " (-1 = all layers)")
        main_gpu = integer("main_gpu", main_gpu, *INT32, " (an index into the offload devices)")
        check_header(self.path)
        ensure_initialized()
        for endpoint in rpc_endpoints(rpc_servers):
            add_rpc_server(endpoint)

        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = {(True, False): C.LLAMA_LOAD_MODE_MMAP, (False, False): C.LLAMA_LOAD_MODE_NONE,
                            (True, True): C.LLAMA_LOAD_MODE_MMAP_MLOCK,
                            (False, True): C.LLAMA_LOAD_MODE_MLOCK}[(bool(use_mmap), bool(use_mlock))]
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        override_array = kv_override_array(kv_overrides, read_gguf(self.path).metadata) if kv_overrides else None
        if override_array is not None:
            params.kv_overrides = override_array
        params.no_alloc = dry_run
        if dry_run:
            # A dry run allocates nothing and maps nothing: llama.cpp asserts (aborting the process) if a
            # no_alloc load is asked to map the file.
            params.load_mode = C.LLAMA_LOAD_MODE_NONE
        self.placement = Placement.parse(placement)
        # The C arrays handed to llama.cpp (overrides, devices, tensor_split) must outlive the load.
        self.resolution, self.split, keep_alive = configure(params, self.path, self.placement, split_mode=split_mode,
                                                            tensor_split=tensor_split, main_gpu=main_gpu,
                                                            devices=devices, n_gpu_layers=n_gpu_layers,
                                                            split_by=split_by)
        self.overrides = self.resolution.overrides  # the (pattern, buffer type) list llama.cpp got
        relay = ProgressRelay(resolve(progress, f"loading {self.path.name}"))
        params.progress_callback = C._llmplace_progress_callback
        params.progress_callback_user_data = relay.handle

        def load_error(reason: str) -> BaseException:
            # A progress callback that raised or returned False is why the load stopped, not llama.cpp's lines
            if relay.exception is not None:
                return relay.exception
            if relay.cancelled:
                return AbortedError(f"loading {self.path} was cancelled by the progress callback")
            return ModelLoadError(f"llama.cpp could not load {self.path}: {reason}")

        with _load_lock:
            handle = native_call(C.llama_model_load_from_file, str(self.path).encode(), params, error=load_error)
        del keep_alive, override_array  # llama.cpp copied what it needed during the load
        if relay.exception is not None:  # raised at the last report, after which llama.cpp finished anyway
            C.llama_model_free(handle)
            raise relay.exception
        self._own(handle, C.llama_model_free)
        self.dry_run = dry_run  # weights were placed but not allocated: metadata and placement only
        self.vocab_only = bool(vocab_only)  # a tokenizer only: no Context can run on it
        # set by load(fit=True): the planning.FitResult this model was loaded with (Any: planning imports this
        # module, and the architecture test refuses the circle even for a type)
        self.fit_result: Any = None
        self.default_n_ctx: int | None = None  # load(n_ctx=N): the size of contexts made without one
        # its open Contexts (context.py imports this module, so the type is not named here)
        self._contexts: weakref.WeakSet[NativeObject] = weakref.WeakSet()
        self._adapters: list[LoRA] = []  # freed by llama.cpp with the model
        self.vocab = Vocab(self)

    def close(self) -> None:
        """Free the model, and first every context still open on it (each once the call in flight on it, in
        another thread, has returned: a generation there stops with ClosedError). Safe to call twice."""
        if not self.closed:
            for context in list(self._contexts):
                # before anything is closed: a callback of a generation on one of them cannot close the model
                context._lifetime.refuse_inside("this Model (one of its Contexts is running the caller)")
        super().close()

    def _close_dependents(self) -> None:
        # No context can be created any more (that is a use of the model): close those there are.
        for context in list(self._contexts):
            context.close()
        for adapter in self._adapters:
            adapter._forget()

    def _call(self, function: Callable[..., _Result], *args: Any) -> _Result:
        """function(model pointer, *args) inside a use of the model (close() in another thread waits for it)."""
        with self._lifetime:
            return function(self._ptr, *args)

    def load_lora(self, path: str | os.PathLike[str]) -> LoRA:
        """Load a LoRA adapter (GGUF) for this model; apply it with Context(model, lora={adapter: scale}) or
        context.set_lora(...). It lives as long as the model."""
        return LoRA(self, path)

    def __repr__(self) -> str:
        if self.closed:
            return f"<llmplace.Model {self.path.name} (closed)>"
        return f"<llmplace.Model {self.path.name}: {self.description}>"

    # ---- metadata ----
    @property
    def arch(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def description(self) -> str:
        """llama.cpp's one-line description, e.g. 'llama 135M Q4_1'."""
        return read_c_string_into_buffer(lambda buf, n: self._call(C.llama_model_desc, buf, n))

    @property
    def n_params(self) -> int:
        return int(self._call(C.llama_model_n_params))

    @property
    def size(self) -> int:
        """Bytes of all weights."""
        return int(self._call(C.llama_model_size))

    @property
    def n_layer(self) -> int:
        return int(self._call(C.llama_model_n_layer))

    @property
    def n_embd(self) -> int:
        return int(self._call(C.llama_model_n_embd))

    @property
    def n_head(self) -> int:
        return int(self._call(C.llama_model_n_head))

    @property
    def n_head_kv(self) -> int:
        return int(self._call(C.llama_model_n_head_kv))

    @property
    def n_ctx_train(self) -> int:
        return int(self._call(C.llama_model_n_ctx_train))

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_tokens

    @property
    def chat_template(self) -> str | None:
        """The chat template shipped in the GGUF (Jinja source), or None."""
        return self.named_chat_template(None)

    def named_chat_template(self, name: str | None) -> str | None:
        """A named chat template of the GGUF ("tool_use": tokenizer.chat_template.tool_use), or None; name None:
        the default one."""
        with self._lifetime:
            value = C.llama_model_chat_template(self._ptr, ffi.NULL if name is None else name.encode("utf-8"))
            return None if value == ffi.NULL else c_string(value)

    @property
    def metadata(self) -> dict[str, str]:
        """Every GGUF key/value as llama.cpp read it (long arrays are abbreviated by llama.cpp)."""
        result = {}
        with self._lifetime:
            ptr = self._ptr
            for i in range(C.llama_model_meta_count(ptr)):
                key = read_c_string_into_buffer(functools.partial(C.llama_model_meta_key_by_index, ptr, i))
                result[key] = read_c_string_into_buffer(
                    functools.partial(C.llama_model_meta_val_str_by_index, ptr, i), 1024)
        return result

    # ---- placement ----
    def placement_report(self) -> list[TensorPlacement]:
        """Where every weight tensor actually landed (read back from llama.cpp), with the rule that placed it.
        Logs a warning naming any tensor a rule sent elsewhere than where it landed."""
        tensors = read_gguf(self.path).tensors
        rows = describe(tensors, self.resolution, read_back(self))
        mismatched = []
        wanted_by_rule: dict[int, str] = {}  # each rule's target resolved once, not once per tensor
        for row in rows:
            if row.rule is not None:
                if row.rule not in wanted_by_rule:
                    wanted_by_rule[row.rule] = buffer_type(self.placement.rules[row.rule].to)[1]
                wanted = wanted_by_rule[row.rule]
                # Host weights may be mapped (CPU_Mapped), repacked for faster kernels (CPU_REPACK) or pinned
                # (CUDA_Host without mmap): all host memory, which is what a "cpu" rule asks for.
                if row.buffer_type != wanted and not (is_host_buffer(wanted) and is_host_buffer(row.buffer_type)):
                    mismatched.append(f"{row.name} ({row.buffer_type}, rule {row.rule} asked for {wanted})")
        if mismatched:
            logs.logger.warning("placement differs from the rules for %d tensors: %s", len(mismatched),
                                ", ".join(mismatched[:20]))
        return rows

    # ---- shortcuts to the vocabulary ----
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self.vocab.detokenize(tokens, special=special)

