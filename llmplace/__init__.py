"""llmplace: run large GGUF language models on the hardware you have.

    import llmplace
    with llmplace.load(path) as model:
        print(llmplace.generate(model, "The capital of France is", max_tokens=16, temperature=0).text)
"""

from .context import Context
from .devices import Device, backend_modules, devices
from .errors import (AbortedError, BuildError, ClosedError, ContextOverflowError, DecodeError, DeviceNotFoundError,
                     InvalidParameterError, LlmplaceError, ModelLoadError, OutOfMemoryError, PlacementError,
                     TokenizationError)
from .generate import Generation, GenerationStep, generate, stream_generate
from .model import Model, load
from .sampling import Sampler, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Context", "generate", "stream_generate", "Generation", "GenerationStep",
    "SamplingParams", "Sampler", "devices", "Device", "backend_modules",
    "LlmplaceError", "BuildError", "ModelLoadError", "ClosedError", "InvalidParameterError", "PlacementError",
    "DeviceNotFoundError", "OutOfMemoryError", "ContextOverflowError", "TokenizationError", "DecodeError",
    "AbortedError",
]
