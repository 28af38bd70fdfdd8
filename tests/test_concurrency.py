"""Threads: one Model serves several Contexts at once; a Context used from two threads raises BusyError
instead of corrupting its cache; the Llama drop-in follows its Context."""

from __future__ import annotations

import threading

import pytest

import llmplace
from llmplace import BusyError

PROMPT = "The three primary colors are"


def test_one_model_serves_a_context_per_thread(smollm2):
    with llmplace.Context(smollm2, n_ctx=256, n_threads=1) as ctx:
        expected = llmplace.generate(smollm2, PROMPT, max_tokens=12, temperature=0, context=ctx).tokens
    results, errors = {}, []

    def run(i):
        try:
            with llmplace.Context(smollm2, n_ctx=256, n_threads=1) as ctx:
                results[i] = llmplace.generate(smollm2, PROMPT, max_tokens=12, temperature=0, context=ctx).tokens
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and [results[i] for i in range(4)] == [expected] * 4


def test_a_context_busy_in_another_thread_raises_and_stays_intact(smollm2):
    with llmplace.Context(smollm2, n_ctx=256, n_threads=1) as ctx:
        expected = llmplace.generate(smollm2, PROMPT, max_tokens=12, temperature=0, context=ctx).tokens
        ctx.clear()
        started, release, out = threading.Event(), threading.Event(), {}

        def slow_generation():
            steps = llmplace.stream_generate(smollm2, PROMPT, max_tokens=12, temperature=0, context=ctx)
            tokens = [next(steps).token]
            started.set()
            release.wait(60)
            out["tokens"] = tokens + [s.token for s in steps]

        worker = threading.Thread(target=slow_generation)
        worker.start()
        assert started.wait(60)
        with pytest.raises(BusyError, match="another thread"):
            llmplace.generate(smollm2, "Other text", max_tokens=4, context=ctx)
        with pytest.raises(BusyError):
            ctx.decode(smollm2.tokenize(" more"))
        release.set()
        worker.join(60)
        assert out["tokens"] == expected            # the interrupted-by-nobody generation is unharmed
        assert llmplace.generate(smollm2, PROMPT, max_tokens=12, temperature=0, context=ctx).tokens == expected


def test_the_same_thread_may_decode_while_it_generates(smollm2):
    with llmplace.Context(smollm2, n_ctx=256, n_threads=1) as ctx:
        steps = llmplace.stream_generate(smollm2, PROMPT, max_tokens=3, temperature=0, context=ctx)
        next(steps)
        ctx.decode(smollm2.tokenize(" and", add_special=False))   # reentrant for the holder
        steps.close()


def test_a_llama_in_use_by_another_thread_raises_busy(smollm2_path):
    llm = llmplace.Llama(str(smollm2_path), n_ctx=256, n_threads=1, verbose=False)
    try:
        stream = llm(PROMPT, max_tokens=8, temperature=0, stream=True)
        first = next(stream)
        seen = {}

        def other():
            try:
                llm(PROMPT, max_tokens=2, temperature=0)
            except BusyError as exc:
                seen["error"] = exc

        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert "another thread" in str(seen.get("error"))
        rest = "".join(chunk["choices"][0]["text"] for chunk in stream)
        assert first["choices"][0]["text"] + rest == llm(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()
