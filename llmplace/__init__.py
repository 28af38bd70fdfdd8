"""llmplace: run large GGUF language models on the hardware you have.

    import llmplace
    with llmplace.load(path) as model:
        print(llmplace.generate(model, "The capital of France is", max_tokens=16, temperature=0).text)

The public names are imported on first use, so `import llmplace` is cheap and the pure-Python parts
(`llmplace.synthetic`, `llmplace.gguf_info`) work without loading the compiled library. No module is named
like a public function (`llmplace.devices()` lives in backends.py, `llmplace.generate()` in generation.py,
`llmplace.load()` and `llmplace.fit()` in planning.py):
importing a submodule binds its name on the package, which would hide the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__  # (as: re-exported)

# public name → module that defines it
_EXPORTS = {
    "load": "planning", "Model": "model",
    "Context": "context", "LoRA": "lora",
    "generate": "generation", "stream_generate": "generation", "Generation": "generation",
    "GenerationStep": "generation", "Engine": "engine", "EngineRequest": "engine", "generate_batch": "engine",
    "SamplingParams": "sampling", "Sampler": "sampling",
    "Placement": "placement", "Rule": "placement", "explain": "planning", "distribute": "placement",
    "cpu_moe": "placement", "n_cpu_moe": "placement",
    "estimate": "planning", "fit": "planning", "FitResult": "planning", "Estimate": "memory",
    "devices": "backends", "Device": "backends", "device": "backends", "backend_modules": "backends",
    **{name: "errors" for name in (
        "LlmplaceError", "BuildError", "ModelLoadError", "ClosedError", "InvalidParameterError", "PlacementError",
        "DeviceNotFoundError", "OutOfMemoryError", "ContextOverflowError", "TokenizationError", "DecodeError",
        "AbortedError", "BusyError", "IncompatibleDraftError", "TemplateError", "ImageError", "MalformedImageError",
        "UnsupportedImageFormatError", "NoProjectorError")},
    "Chat": "chat", "Reply": "chat", "format_chat": "chat",
    "Projector": "images", "ImagePrompt": "images", "load_image": "images",
    "Llama": "compat.llama",
    "quantize": "quantization", "QUANTIZE_TYPES": "quantization", "SpeculativeStats": "speculative",
}

__all__ = sorted(_EXPORTS)

# The same names for type checkers, which do not run __getattr__: `llmplace.load` types as planning.load, not Any.
# Never executed, so `import llmplace` stays cheap. `name as name` marks each one as re-exported (mypy --strict).
# tests/test_public_api.py checks that this block and _EXPORTS name the same things from the same modules.
if TYPE_CHECKING:
    from .backends import backend_modules as backend_modules, Device as Device, device as device, devices as devices
    from .chat import Chat as Chat, format_chat as format_chat, Reply as Reply
    from .compat.llama import Llama as Llama
    from .context import Context as Context
    from .engine import Engine as Engine, EngineRequest as EngineRequest, generate_batch as generate_batch
    from .errors import (AbortedError as AbortedError, BuildError as BuildError, BusyError as BusyError,
                         ClosedError as ClosedError, ContextOverflowError as ContextOverflowError,
                         DecodeError as DecodeError, DeviceNotFoundError as DeviceNotFoundError,
                         ImageError as ImageError, IncompatibleDraftError as IncompatibleDraftError,
                         InvalidParameterError as InvalidParameterError, LlmplaceError as LlmplaceError,
                         MalformedImageError as MalformedImageError, ModelLoadError as ModelLoadError,
                         NoProjectorError as NoProjectorError, OutOfMemoryError as OutOfMemoryError,
                         PlacementError as PlacementError, TemplateError as TemplateError,
                         TokenizationError as TokenizationError,
                         UnsupportedImageFormatError as UnsupportedImageFormatError)
    from .generation import (generate as generate, Generation as Generation, GenerationStep as GenerationStep,
                             stream_generate as stream_generate)
    from .images import ImagePrompt as ImagePrompt, load_image as load_image, Projector as Projector
    from .lora import LoRA as LoRA
    from .memory import Estimate as Estimate
    from .model import Model as Model
    from .placement import (cpu_moe as cpu_moe, distribute as distribute, n_cpu_moe as n_cpu_moe,
                            Placement as Placement, Rule as Rule)
    from .planning import estimate as estimate, explain as explain, fit as fit, FitResult as FitResult, load as load
    from .quantization import quantize as quantize, QUANTIZE_TYPES as QUANTIZE_TYPES
    from .sampling import Sampler as Sampler, SamplingParams as SamplingParams
    from .speculative import SpeculativeStats as SpeculativeStats


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmplace' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
