"""The Vulkan checks of tests/test_vulkan.py, run in a process of their own on lavapipe (Mesa's CPU Vulkan device).

Why a process of its own: like llama.cpp, the Vulkan backend takes discrete and integrated GPUs only; a CPU
device such as lavapipe becomes `Vulkan0` only when GGML_VK_VISIBLE_DEVICES names it, and the backend reads that
once, when llmplace loads its backend modules. Set for the whole test run, it would put every other test's
model on lavapipe. So the test starts this script with that variable (and the Vulkan loader pointed at lavapipe's
driver file alone, so that Vulkan0 is lavapipe on any machine), and it prints one line `RESULT <json>` with what
it saw: the devices, where tensors were planned and where they landed, the CPU's and Vulkan0's logits, and what
`estimate` and `fit` planned against what was allocated. tests/test_vulkan.py makes the assertions.

    python tests/vulkan_lavapipe.py '{"tiny_llama": PATH, "tiny_qwen3moe": PATH, "small_qwen3moe": PATH}'
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Callable

# Debian's mesa-vulkan-drivers (and most distributions) install lavapipe's driver file here.
ICD_GLOBS = ("/usr/share/vulkan/icd.d/lvp_icd*.json", "/etc/vulkan/icd.d/lvp_icd*.json",
             "/usr/local/share/vulkan/icd.d/lvp_icd*.json")


def lavapipe_icd() -> str | None:
    """The path of lavapipe's Vulkan driver file (ICD manifest), or None where Mesa's lavapipe is not installed."""
    for pattern in ICD_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def lavapipe_env(icd: str) -> dict[str, str]:
    """Environment that makes lavapipe the one Vulkan device, Vulkan0: the loader reads only its driver file
    (VK_DRIVER_FILES; VK_ICD_FILENAMES for loaders before 1.3.207) and ggml takes physical device 0."""
    return dict(os.environ, VK_DRIVER_FILES=icd, VK_ICD_FILENAMES=icd, GGML_VK_VISIBLE_DEVICES="0")


# Prompts of the agreement check, and tokens followed after each (few: a token on lavapipe costs ~0.1 s).
PROMPTS = ("The history of the printing press begins", "def fibonacci(n):\n    return",
           "Photosynthesis is the process by which")
N_TOKENS = 32


def _devices() -> dict:
    import llmplace
    from llmplace.backends import backend_modules, plugin_mismatch

    modules = [dict(name=m.name, path=str(m.path), loaded=m.loaded, error=m.error) for m in backend_modules()]
    vulkan = [m for m in backend_modules() if m.name == "vulkan"]
    return dict(devices=[d.__dict__ for d in llmplace.devices()], modules=modules,
                plugin_mismatch=plugin_mismatch(vulkan[0].path.parent) if vulkan else "no vulkan module")


def _placements() -> dict:
    from llmplace.placement import Placement, Rule, cpu_moe

    return {
        # the placement: experts in RAM, everything else offloaded (to the one GPU, Vulkan0)
        "experts on CPU": (cpu_moe(), -1),
        # rules that name the device, the rest of the layers kept on the CPU
        "attention on Vulkan0": (Placement([Rule("Vulkan0", role="attention"), Rule("cpu", pattern=r"^blk\.")]), -1),
        # an -ot string, nothing offloaded by layer: only what the rule names goes to Vulkan0
        "output on Vulkan0": ("output=Vulkan0", 0),
    }


def _explain_and_read_back(path: str) -> dict:
    import llmplace
    from llmplace.placement import is_host_buffer, read_back
    from llmplace.planning import explain

    result = {}
    for name, (placement, n_gpu_layers) in _placements().items():
        plan = explain(path, placement, n_gpu_layers=n_gpu_layers)
        with llmplace.load(path, placement=placement, n_gpu_layers=n_gpu_layers, progress=False) as model:
            landed = model.placement_report()
            loaded_bytes: dict[str, int] = {}
            for buffer_type, n_bytes in read_back(model).values():
                memory = "host" if is_host_buffer(buffer_type) else buffer_type
                loaded_bytes[memory] = loaded_bytes.get(memory, 0) + n_bytes
        result[name] = dict(
            planned=[[t.name, t.role, t.memory, t.rule] for t in plan.tensors],
            landed=[[t.name, t.role, t.memory, t.rule] for t in landed],
            planned_bytes=plan.memory_totals(), loaded_bytes=loaded_bytes)
    return result


def _agreement(path: str, placement: object) -> dict:
    """The CPU's greedy text is the reference; Vulkan0 follows that text one token at a time (teacher forcing, as
    tests/test_gpu.py does for CUDA), and at each position both next-token logit vectors are kept."""
    import numpy as np

    import llmplace

    positions = []
    with llmplace.load(path, n_gpu_layers=0, progress=False) as cpu_model, \
            llmplace.load(path, placement=placement, progress=False) as vk_model:
        on_vulkan = sorted({t.memory for t in vk_model.placement_report()})
        for prompt in PROMPTS:
            reference = llmplace.generate(cpu_model, prompt, max_tokens=N_TOKENS, temperature=0).tokens
            with llmplace.Context(cpu_model, n_ctx=256) as cpu_ctx, llmplace.Context(vk_model, n_ctx=256) as vk_ctx:
                cpu_ctx.decode(cpu_model.tokenize(prompt))
                vk_ctx.decode(vk_model.tokenize(prompt))
                for token in reference:
                    a = np.asarray(cpu_ctx.logits(), dtype=np.float64)
                    b = np.asarray(vk_ctx.logits(), dtype=np.float64)
                    choice = int(b.argmax())
                    positions.append(dict(cpu=int(a.argmax()), vulkan=choice,
                                          max_abs_diff=float(np.abs(a - b).max()),
                                          cpu_margin=float(a.max() - a[choice]), cpu_std=float(a.std())))
                    cpu_ctx.decode([token])
                    vk_ctx.decode([token])
    return dict(memories=on_vulkan, positions=positions)


def _memory(path: str) -> dict:
    """estimate against the real allocation on Vulkan0; then fit with no budget (so bounded by the free memory
    llmplace reports for Vulkan0) and a margin that leaves room for all but 12 MiB of the model there."""
    import llmplace
    from llmplace.memory import breakdown
    from llmplace.placement import is_host_buffer
    from llmplace.planning import estimate, fit

    opts = dict(n_ctx=512, n_ubatch=16)
    reported = llmplace.device("Vulkan0")
    planned = estimate(path, "exps=CPU", devices=["Vulkan0"], **opts)
    with llmplace.load(path, placement="exps=CPU", devices=["Vulkan0"], progress=False) as model, \
            llmplace.Context(model, **opts) as ctx:
        real = breakdown(ctx._ptr)
    everything = estimate(path, devices=["Vulkan0"], **opts)["Vulkan0"].total
    room = everything - 12 * 2**20
    margin = reported.memory_free - room
    result = fit(path, margin=margin, devices=["Vulkan0"], **opts)
    with llmplace.load(path, progress=False, devices=["Vulkan0"], **result.load_kwargs()) as model:
        moved = [[t.name, t.role, t.layer, is_host_buffer(t.buffer_type)] for t in model.placement_report()
                 if t.rule is not None]
        with llmplace.Context(model, **opts) as ctx:
            used = breakdown(ctx._ptr)["Vulkan0"]
            tokens = llmplace.generate(model, "Hi", max_tokens=3, temperature=0, context=ctx).tokens
            free_while_loaded = llmplace.device("Vulkan0").memory_free
    return dict(
        device=dict(free=reported.memory_free, total=reported.memory_total, free_while_loaded=free_while_loaded),
        estimate={k: dict(buffers=v.buffers, total=v.total) for k, v in planned.memories.items()},
        real={k: dict(buffers=v.buffers, total=v.total) for k, v in real.items()},
        everything=everything, room=room, margin=margin,
        fit=dict(success=result.success, message=result.message, total=result.estimate["Vulkan0"].total,
                 runtime=result.estimate["Vulkan0"].runtime, moved=moved, used_buffers=used.buffers,
                 used_total=used.total, tokens=tokens))


def main(spec: dict) -> dict:
    from llmplace.placement import cpu_moe

    seconds = {}

    def timed(name: str, fn: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        return value

    result = dict(devices=timed("devices", _devices), seconds=seconds)
    if not any(d["name"] == "Vulkan0" for d in result["devices"]["devices"]):
        return result  # the test says why from the modules' errors
    result["placements"] = timed("placements", lambda: _explain_and_read_back(spec["tiny_qwen3moe"]))
    result["agreement"] = {
        "tiny-llama, all on Vulkan0": timed("agreement tiny-llama", lambda: _agreement(spec["tiny_llama"], None)),
        "tiny-qwen3moe, experts on CPU": timed("agreement tiny-qwen3moe",
                                               lambda: _agreement(spec["tiny_qwen3moe"], cpu_moe()))}
    result["memory"] = timed("memory", lambda: _memory(spec["small_qwen3moe"]))
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
