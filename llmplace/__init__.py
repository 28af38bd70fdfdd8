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

__version__ = "0.1.0"

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
        "AbortedError", "BusyError", "IncompatibleDraftError", "TemplateError")},
    "Chat": "chat", "Reply": "chat", "format_chat": "chat",
    "Llama": "compat.llama",
    "quantize": "quantization", "QUANTIZE_TYPES": "quantization", "SpeculativeStats": "speculative",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmplace' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
