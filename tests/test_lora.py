"""LoRA adapters on a real model (SmolLM2) with random low-rank deltas written by llmplace.synthetic.write_lora."""

from __future__ import annotations

import pytest

import llmplace
from llmplace import synthetic

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter_path(smollm2_path, tmp_path_factory):
    return synthetic.write_lora(tmp_path_factory.mktemp("lora") / "smollm2-lora.gguf", smollm2_path, rank=8)


def greedy(model, ctx) -> str:
    return llmplace.generate(model, PROMPT, max_tokens=16, temperature=0, context=ctx).text


def test_an_adapter_changes_the_output_by_its_scale_and_can_be_removed(smollm2_path, adapter_path):
    with llmplace.load(smollm2_path, progress=False) as model:
        adapter = model.load_lora(adapter_path)
        assert adapter.alpha == 8.0
        with llmplace.Context(model, n_ctx=256, n_threads=1) as ctx:
            base = greedy(model, ctx)
            ctx.set_lora({adapter: 0.0})
            assert greedy(model, ctx) == base
            ctx.set_lora({adapter: 4.0})
            adapted = greedy(model, ctx)
            assert adapted != base
            ctx.set_lora({})
            assert greedy(model, ctx) == base
        with llmplace.Context(model, n_ctx=256, n_threads=1, lora={adapter: 4.0}) as ctx:
            assert greedy(model, ctx) == adapted
    with pytest.raises(llmplace.ClosedError):
        adapter._ptr  # noqa: B018 - reading it must raise


def test_bad_adapters_are_refused_with_the_reason(smollm2_path, smollm2, adapter_path, tiny_llama_path,
                                                  tiny_qwen3moe_path, tmp_path):
    with pytest.raises(llmplace.InvalidParameterError, match="not a LoRA adapter"):
        smollm2.load_lora(smollm2_path)
    other_arch = synthetic.write_lora(tmp_path / "qwen.gguf", tiny_qwen3moe_path, rank=2)
    with pytest.raises(llmplace.InvalidParameterError, match="LoRA for 'qwen3moe' models"):
        smollm2.load_lora(other_arch)
    other_shape = synthetic.write_lora(tmp_path / "tiny.gguf", tiny_llama_path, rank=2)
    with pytest.raises(llmplace.ModelLoadError, match="incorrect shape"):
        smollm2.load_lora(other_shape)
    with pytest.raises(llmplace.ModelLoadError, match="not found"):
        smollm2.load_lora(tmp_path / "missing.gguf")
    with llmplace.load(tiny_llama_path, progress=False) as tiny, llmplace.Context(smollm2, n_ctx=64) as ctx:
        foreign = tiny.load_lora(other_shape)
        with pytest.raises(llmplace.InvalidParameterError, match="another model"):
            ctx.set_lora({foreign: 1.0})
        adapter = smollm2.load_lora(adapter_path)
        # inf and 1e300 (inf as a float32) made every logit NaN: garbage text with no error
        for bad in ({adapter: "1"}, {adapter: float("nan")}, {adapter: float("inf")}, {adapter: 1e300}, [adapter],
                    {"x": 1.0}):
            with pytest.raises(llmplace.InvalidParameterError):
                ctx.set_lora(bad)
    assert llmplace.generate(smollm2, PROMPT, max_tokens=2, temperature=0).tokens


def test_llama_cpp_python_lora_keywords(smollm2_path, adapter_path):
    texts = {}
    for scale in (None, 0.0, 4.0):
        kwargs = {} if scale is None else {"lora_path": str(adapter_path), "lora_scale": scale}
        with llmplace.Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False, **kwargs) as llm:
            texts[scale] = llm(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]
    assert texts[0.0] == texts[None] != texts[4.0]
