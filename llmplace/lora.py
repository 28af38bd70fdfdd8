"""LoRA adapters: low-rank weight deltas applied on top of a loaded model, per context, at a chosen scale.

    adapter = model.load_lora("style-lora.gguf")
    with llmplace.Context(model, lora={adapter: 0.8}) as ctx:
        llmplace.generate(model, "...", context=ctx)
    ctx.set_lora({})                      # back to the plain model

An adapter belongs to its model: llama.cpp frees it with the model, and a context keeps raw pointers to the
adapters it applies, so an adapter is never freed on its own (freeing one a context still uses would crash
the process); closing the model closes its adapters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ._ffi import C, CData, ffi
from .errors import ClosedError, InvalidParameterError, ModelLoadError
from .gguf_info import check_header
from .gguf_info import read as read_gguf
from .native_errors import native_call

if TYPE_CHECKING:
    from ._handle import Lifetime


class AdapterModel(Protocol):
    """What a LoRA uses of the Model it is loaded for (model.py imports this module, so Model is not named)."""

    _lifetime: Lifetime
    _adapters: list[LoRA]

    @property
    def arch(self) -> str: ...

    @property
    def _ptr(self) -> CData: ...


class LoRA:
    """A LoRA adapter loaded for one model (see `Model.load_lora`)."""

    def __init__(self, model: AdapterModel, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.fspath(path)).expanduser()
        check_header(self.path)
        info = read_gguf(self.path)
        kind = (info.metadata.get("general.type"), info.metadata.get("adapter.type"))
        if kind != ("adapter", "lora"):
            raise InvalidParameterError(f"{self.path} is not a LoRA adapter (general.type={kind[0]!r}, "
                                        f"adapter.type={kind[1]!r}; expected 'adapter' and 'lora'): convert the "
                                        "adapter to GGUF with llama.cpp's convert_lora_to_gguf.py")
        if info.arch != model.arch:
            raise InvalidParameterError(f"{self.path.name} is a LoRA for {info.arch!r} models, and this model is "
                                        f"{model.arch!r}: use the adapter made for this base model")
        # Inside a use of the model: Model.close() in another thread waits for the adapter to be listed in
        # model._adapters (and forgets it) instead of freeing the model under the load.
        with model._lifetime:
            self._handle = native_call(C.llama_adapter_lora_init, model._ptr, str(self.path).encode(),
                                       error=lambda reason: ModelLoadError(
                                           f"llama.cpp could not load the LoRA adapter {self.path}: {reason}"))
            self.model = model
            model._adapters.append(self)

    @property
    def _ptr(self) -> CData:
        if self._handle == ffi.NULL:
            raise ClosedError("this LoRA adapter's model is closed")
        return self._handle

    @property
    def alpha(self) -> float:
        return float(read_gguf(self.path).metadata.get("adapter.lora.alpha", 0.0))

    def _forget(self) -> None:
        """Called when the model is freed (llama.cpp frees the adapter with it)."""
        self._handle = ffi.NULL

    def __repr__(self) -> str:
        return f"<llmplace.LoRA {self.path.name}{' (closed)' if self._handle == ffi.NULL else ''}>"


def apply(ctx_ptr: CData, model: AdapterModel, adapters: Mapping[LoRA, float]) -> list[CData]:
    """Set the adapters a context applies (an empty mapping: none); returns the C arrays llama.cpp reads."""
    if not isinstance(adapters, Mapping):
        raise InvalidParameterError("lora must be a dict of LoRA adapter -> scale, e.g. {adapter: 1.0}")
    for adapter, scale in adapters.items():
        if not isinstance(adapter, LoRA):
            raise InvalidParameterError(f"lora keys must be adapters from model.load_lora(path), not {adapter!r}")
        if adapter.model is not model:
            raise InvalidParameterError(f"{adapter!r} was loaded for another model; load it with this model's "
                                        "load_lora()")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            # inf (or 1e300, inf as a float32) turned every logit into NaN: garbage text, no error
            raise InvalidParameterError(f"the scale of {adapter!r} must be a finite number, not {scale!r}")
        if abs(scale) > 3.4e38:
            raise InvalidParameterError(f"the scale of {adapter!r} must fit a float32, not {scale!r}")
    n = len(adapters)
    pointers = ffi.new("struct llama_adapter_lora *[]", max(n, 1))
    scales = ffi.new("float[]", max(n, 1))
    for i, (adapter, scale) in enumerate(adapters.items()):
        pointers[i], scales[i] = adapter._ptr, scale
    C.llama_set_adapters_lora(ctx_ptr, pointers, n, scales)
    return [pointers, scales]
