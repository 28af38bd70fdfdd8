"""Sessions beyond slots (llmplace.engine): more conversations than slots share one Engine; an idle
conversation's KV state waits in its slot, then in host memory, and its next turn gives exactly the tokens its
full prompt gives run alone, whether the state was kept, saved and restored, or dropped and computed again."""

from __future__ import annotations

import warnings

import pytest

import llmplace
from llmplace.context import Context
from llmplace.engine import FA_TILE_ROWS
from llmplace.errors import InvalidParameterError, UnknownKeywordError

THREADS = 1  # as tests/test_engine.py: a lone run with the engine's thread count
REPLY = 6
TOPICS = ["the harbour", "the lighthouse", "the market", "the old mill", "the river", "the bell tower"]


def opening(topic: str) -> str:
    # > FA_TILE_ROWS tokens: the first turn's rows are computed by the tiled kernel, as a lone run of a later
    # (longer) prompt computes them, so a kept or restored state is reusable under exact=True
    return (f"A short history of {topic}. " + f"The story of {topic} is long and full of storms, trade and "
            "quarrels, and every family in town has a part in it. " * 2 + f"Question: who built {topic}?\nAnswer:")


def alone(model, tokens: list[int]) -> llmplace.Generation:
    with Context(model, n_ctx=1024, n_threads=THREADS) as ctx:
        return llmplace.generate(model, tokens, context=ctx, max_tokens=REPLY, temperature=0)


def next_prompt(model, prompt: list[int], reply: llmplace.Generation, turn: int) -> list[int]:
    """A chat's next turn: the last prompt, the reply, and a new question (tokens, so the prefix is exact)."""
    question = model.tokenize(f"\nQuestion {turn + 2}: and what happened next?\nAnswer:", add_special=False)
    return prompt + reply.tokens + question


def same(result, reference):
    assert (result.tokens, result.text, result.finish_reason) == (reference.tokens, reference.text,
                                                                    reference.finish_reason)


def run_turns(engine, model, names: list[str], prompts: dict[str, list[int]], turns: int) -> list[int]:
    """Every session speaks `turns` times, all sessions' turns submitted at once (interleaved over the slots);
    each reply checked against a lone run. Returns each later turn's prompt_cached."""
    cached = []
    for turn in range(turns):
        handles = {name: engine.submit(prompts[name], max_tokens=REPLY, temperature=0, session=name)
                   for name in names}
        for name, handle in handles.items():
            result = handle.result(timeout=120)
            same(result, alone(model, prompts[name]))
            if turn:
                cached.append(list(handle)[-1].prompt_cached)
            prompts[name] = next_prompt(model, prompts[name], result, turn)
    return cached


def test_six_sessions_over_two_slots_equal_lone_runs_kept_restored_or_dropped(smollm2):
    names = [f"chat-{i}" for i in range(6)]
    with llmplace.Engine(smollm2, slots=2, n_ctx=1024, n_threads=THREADS) as engine:
        prompts = {name: smollm2.tokenize(opening(topic)) for name, topic in zip(names, TOPICS)}
        assert min(len(p) for p in prompts.values()) > FA_TILE_ROWS
        cached = run_turns(engine, smollm2, names, prompts, turns=3)
        sessions = engine.sessions()
        assert sorted(s.id for s in sessions) == names
        where = sorted(s.where for s in sessions)
        assert where == ["host"] * 4 + ["slot 0", "slot 1"]
        assert all(s.bytes > 0 for s in sessions if s.where == "host")
        assert all(s.bytes == 0 and s.tokens for s in sessions if s.where != "host")
        # the later turns reused their session's state (restored from host memory: 6 sessions, 2 slots)
        assert all(n > 0 for n in cached), cached
        # bounded host memory: room for about one state -> the least recently used others are dropped
        one = max(s.bytes for s in sessions)
        engine.max_session_bytes = one + one // 2
        cached = run_turns(engine, smollm2, names, prompts, turns=1)
        hosts = [s for s in engine.sessions() if s.where == "host"]
        assert len(hosts) <= 1 and sum(s.bytes for s in hosts) <= engine.max_session_bytes
        engine.max_session_bytes = 0  # none kept in host memory: every other turn is computed again
        cached = run_turns(engine, smollm2, names, prompts, turns=1)
        assert sorted(s.where for s in engine.sessions()) == ["slot 0", "slot 1"]


def test_a_session_kept_in_its_slot_continues_there_and_drop_session_forgets_it(smollm2):
    with llmplace.Engine(smollm2, slots=2, n_ctx=1024, n_threads=THREADS) as engine:
        prompt = smollm2.tokenize(opening("the harbour"))
        first = engine.generate(prompt, max_tokens=REPLY, temperature=0, session="a")
        [info] = engine.sessions()
        assert (info.id, info.where, info.bytes) == ("a", info.where, 0) and info.where.startswith("slot ")
        assert list(info.tokens) == prompt + first.tokens[:-1]  # the last reply token is not computed yet
        prompt = next_prompt(smollm2, prompt, first, 0)
        handle = engine.submit(prompt, max_tokens=REPLY, temperature=0, session="a")
        same(handle.result(timeout=120), alone(smollm2, prompt))
        assert list(handle)[-1].prompt_cached > 0
        # two turns of one session at once: the second waits for the first
        handles = [engine.submit(prompt, max_tokens=REPLY, temperature=0, session="a") for _ in range(2)]
        for handle in handles:
            same(handle.result(timeout=120), alone(smollm2, prompt))
        engine.drop_session("a")
        assert engine.sessions() == []
        with pytest.raises(InvalidParameterError, match="no session 'a'"):
            engine.drop_session("a")


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_state_llama_cpp_refuses_is_computed_again_with_a_warning(smollm2, damage):
    with llmplace.Engine(smollm2, slots=1, n_ctx=1024, n_threads=THREADS) as engine:
        prompts = {name: smollm2.tokenize(opening(topic)) for name, topic in zip("ab", TOPICS)}
        replies = {name: engine.generate(prompts[name], max_tokens=REPLY, temperature=0, session=name)
                   for name in "ab"}
        assert [(s.id, s.where) for s in engine.sessions()] == [("a", "host"), ("b", "slot 0")]
        record = engine._sessions["a"]
        state = bytes(record.state)
        record.state = state[:len(state) // 2] if damage == "truncated" else bytes(len(state))
        prompt = next_prompt(smollm2, prompts["a"], replies["a"], 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = engine.submit(prompt, max_tokens=REPLY, temperature=0, session="a")
            result = handle.result(timeout=120)
        assert any(issubclass(w.category, RuntimeWarning) and "could not be restored" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        same(result, alone(smollm2, prompt))
        assert list(handle)[-1].prompt_cached == 0
        assert [(s.id, s.where) for s in engine.sessions()] == [("b", "host"), ("a", "slot 0")]


def test_save_and_restore_sequence_give_the_computed_logits_and_reuse_a_buffer(smollm2):
    import numpy as np

    from llmplace.engine import restore_sequence, save_sequence

    tokens = smollm2.tokenize(opening("the market"))
    with Context(smollm2, n_ctx=1024, n_seq_max=2, n_threads=THREADS, extra_params={"kv_unified": False}) as ctx:
        ctx.decode_batch([(1, t, i, False) for i, t in enumerate(tokens)])
        state = save_sequence(ctx, 1)
        bigger = bytearray(len(state) + 100)
        again = save_sequence(ctx, 1, bigger)   # into a buffer freed before: no new memory
        assert again.obj is bigger and bytes(again) == bytes(state)
        restore_sequence(ctx, 0, again, tokens)
        assert ctx.tokens == tokens and ctx.sequence_length(0) == len(tokens)
        rows = ctx.decode_batch([(s, tokens[0], len(tokens), True) for s in (0, 1)])
        assert np.array_equal(ctx.logits(rows[0]), ctx.logits(rows[1]))
        with pytest.raises(InvalidParameterError, match="refused the saved state"):
            restore_sequence(ctx, 0, bytes(state)[:len(state) // 2], tokens)
        assert ctx.tokens == [] and ctx.sequence_length(0) == 0


def test_bad_session_arguments_raise_typed_errors(smollm2):
    with pytest.raises(InvalidParameterError, match="max_session_bytes"):
        llmplace.Engine(smollm2, slots=1, n_ctx=256, max_session_bytes=-1)
    with llmplace.Engine(smollm2, slots=1, n_ctx=256, n_threads=THREADS) as engine:
        for bad in (7, b"id", ""):
            with pytest.raises(InvalidParameterError, match="session must be a non-empty str"):
                engine.submit("Hello", max_tokens=1, session=bad)
        with pytest.raises(InvalidParameterError, match="a session id is a str"):
            engine.drop_session(7)
        with pytest.raises(InvalidParameterError, match="no session 'nobody'"):
            engine.drop_session("nobody")
        with pytest.raises(UnknownKeywordError):
            engine.submit("Hello", sesion="a")
