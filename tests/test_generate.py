"""Generation: determinism, agreement with llama.cpp's own llama-simple, stop strings, UTF-8, sampling."""

from __future__ import annotations

import dataclasses

import models
import pytest

import llmplace

PROMPT = "The three primary colors are"


def test_greedy_generation_is_deterministic(smollm2):
    first = llmplace.generate(smollm2, PROMPT, max_tokens=32, temperature=0)
    second = llmplace.generate(smollm2, PROMPT, max_tokens=32, temperature=0)
    assert first.tokens == second.tokens
    assert len(first.tokens) == 32 and first.finish_reason == "length"
    assert first.text.strip()


def test_greedy_tokens_equal_llama_simple(smollm2, smollm2_path):
    """llama.cpp's own example program, built from the same source, produces the same text."""
    n_predict = 48
    reference = models.llama_simple_reply(smollm2, PROMPT, n_predict)
    ours = llmplace.generate(smollm2, PROMPT, max_tokens=n_predict, temperature=0)
    assert ours.text == reference
    assert len(ours.tokens) == n_predict


def test_stream_yields_one_frozen_step_per_token(smollm2):
    steps = list(llmplace.stream_generate(smollm2, PROMPT, max_tokens=10, temperature=0))
    assert len(steps) == 10
    assert [s.generated_tokens for s in steps] == list(range(1, 11))
    assert all(s.finish_reason is None for s in steps[:-1]) and steps[-1].finish_reason == "length"
    assert steps[0].prompt_tokens == len(smollm2.tokenize(PROMPT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        steps[0].text = "changed"  # frozen
    whole = llmplace.generate(smollm2, PROMPT, max_tokens=10, temperature=0)
    assert "".join(s.text for s in steps) == whole.text


def test_stop_string_ends_generation_and_is_not_emitted(smollm2):
    full = llmplace.generate(smollm2, PROMPT, max_tokens=40, temperature=0).text
    # Pick a stop string from the middle of the greedy reply, spanning whatever token boundary lies there.
    stop = full[12:16]
    assert len(stop) == 4
    result = llmplace.generate(smollm2, PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[:full.find(stop)]


def test_multibyte_characters_split_across_tokens_come_out_whole(smollm2):
    # A repeated pattern of characters whose UTF-8 bytes the tokenizer splits across tokens: the model
    # continues the pattern, so generation produces partial-character tokens.
    prompt = "🙂🙃🙂🙃🙂🙃🙂🙃🙂🙃🙂🙃"
    steps = list(llmplace.stream_generate(smollm2, prompt, max_tokens=24, temperature=0))
    raw = b"".join(smollm2.vocab.piece(s.token) for s in steps if not smollm2.vocab.is_eog(s.token))
    assert any(s.text == "" for s in steps[:-1]), "expected a token holding only part of a character"
    text = "".join(s.text for s in steps)
    assert text == raw.decode("utf-8", errors="replace")
    assert "\ufffd" not in text[:-1]
    assert "🙂" in text or "🙃" in text


def test_tokenize_round_trip_with_multibyte_text(smollm2):
    for text in ["plain ascii", "naïve café — 日本語 🙂 ∑ x² ½", "  leading spaces and\nnewlines\t"]:
        tokens = smollm2.tokenize(text, add_special=False)
        assert smollm2.detokenize(tokens) == text
        assert smollm2.tokenize(text.encode("utf-8"), add_special=False) == tokens


def test_seeded_sampling_is_reproducible_and_seeds_differ(smollm2):
    a = llmplace.generate(smollm2, PROMPT, max_tokens=24, temperature=1.0, seed=7)
    b = llmplace.generate(smollm2, PROMPT, max_tokens=24, temperature=1.0, seed=7)
    c = llmplace.generate(smollm2, PROMPT, max_tokens=24, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_logit_bias_forces_a_token(smollm2):
    target = smollm2.tokenize(" banana", add_special=False)[0]
    result = llmplace.generate(smollm2, PROMPT, max_tokens=3, temperature=0, logit_bias={target: 100.0})
    assert result.tokens == [target] * 3


def test_repeat_penalty_changes_greedy_output(smollm2):
    plain = llmplace.generate(smollm2, "one one one one one one", max_tokens=16, temperature=0)
    penalized = llmplace.generate(smollm2, "one one one one one one", max_tokens=16, temperature=0,
                                  repeat_penalty=1.8, penalty_last_n=64)
    assert plain.tokens != penalized.tokens


def test_context_reuses_cached_prompt_prefix(smollm2):
    with llmplace.Context(smollm2, n_ctx=512) as ctx:
        first = list(llmplace.stream_generate(smollm2, PROMPT, max_tokens=4, temperature=0, context=ctx))
        assert first[-1].prompt_cached == 0
        again = list(llmplace.stream_generate(smollm2, PROMPT + " red", max_tokens=4, temperature=0, context=ctx))
        n_prompt = len(smollm2.tokenize(PROMPT))
        assert again[-1].prompt_cached >= n_prompt - 1
        fresh = llmplace.generate(smollm2, PROMPT + " red", max_tokens=4, temperature=0)
        assert [s.token for s in again] == fresh.tokens


def test_generation_stops_at_end_of_generation_token(smollm2):
    from llmplace.chat import format_chat

    prompt = format_chat(smollm2, [{"role": "user", "content": "Say only the word yes."}])
    result = llmplace.generate(smollm2, prompt, max_tokens=200, temperature=0, add_special=False)
    assert result.finish_reason == "stop"
    assert len(result.tokens) < 200
    assert smollm2.vocab.is_eog(result.tokens[-1])


def test_gemma3_loads_and_generates(gemma3_path):
    with llmplace.load(gemma3_path, progress=False) as model:
        assert model.arch == "gemma3"
        result = llmplace.generate(model, "The capital of France is", max_tokens=12, temperature=0)
        assert len(result.tokens) >= 1 and result.text.strip()
        assert result.text == llmplace.generate(model, "The capital of France is", max_tokens=12, temperature=0).text


@pytest.mark.parametrize("fixture,arch", [("tiny_llama_path", "llama"), ("tiny_qwen3moe_path", "qwen3moe")])
def test_synthetic_models_load_and_generate(request, fixture, arch):
    path = request.getfixturevalue(fixture)
    with llmplace.load(path, progress=False) as model:
        assert model.arch == arch
        result = llmplace.generate(model, "Hello", max_tokens=8, temperature=0)
        assert len(result.tokens) == 8 or result.finish_reason == "stop"
        again = llmplace.generate(model, "Hello", max_tokens=8, temperature=0)
        assert result.tokens == again.tokens


def test_stream_generate_checks_arguments_when_called(smollm2):
    # No iteration needed: a bad value raises at the call, where the mistake is.
    with pytest.raises(llmplace.InvalidParameterError, match="top_p"):
        llmplace.stream_generate(smollm2, "Hi", top_p=3.0)
    with pytest.raises(llmplace.ContextOverflowError):
        with llmplace.Context(smollm2, n_ctx=64) as ctx:
            llmplace.stream_generate(smollm2, "word " * (ctx.n_ctx + 1), context=ctx)
