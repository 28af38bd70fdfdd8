"""Interruption: Ctrl-C (KeyboardInterrupt) or an abort during load, prompt processing and generation stops
within one batch and leaves the object usable. (tests/test_chat.py covers the same for Chat: abort during a
long prompt and during a reply, Ctrl-C during a reply; these cover load, Context and plain generate.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import llmplace
from llmplace import AbortedError
from llmplace._ffi import C

PROMPT = "Summarise this: " + "the cat sat on the mat and looked at the sea. " * 60
STORY = "Once upon a time, in a small village,"  # SmolLM2 goes on for 200+ tokens from this, greedily
GREEDY = {"temperature": 0}


def _cache_length(ctx) -> int:
    """Where sequence 0 ends in llama.cpp's KV cache (what ctx.tokens must agree with)."""
    return C.llama_memory_seq_pos_max(C.llama_get_memory(ctx._ptr), 0) + 1


def _assert_reusable(model, ctx) -> None:
    """The interrupted context agrees with its cache and generates what a fresh one does."""
    assert _cache_length(ctx) == len(ctx.tokens)
    again = llmplace.generate(model, "The capital of France is", max_tokens=4, context=ctx, **GREEDY)
    with llmplace.Context(model, n_ctx=ctx.n_ctx, n_threads=1) as fresh:
        assert again.tokens == llmplace.generate(model, "The capital of France is", max_tokens=4, context=fresh,
                                                 **GREEDY).tokens


class _WhenReady:
    """Run `act()` once from a thread as soon as `ready()` is true, while the `with` block runs."""

    def __init__(self, ready, act) -> None:
        self.ready, self.act, self.stop = ready, act, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                self.act()
                return
            time.sleep(0.0005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class _SigintWhen(_WhenReady):
    """Send SIGINT to this process once `ready()` is true (Python raises KeyboardInterrupt in the main thread
    at its next bytecode, i.e. as soon as the running C call returns)."""

    def __init__(self, ready) -> None:
        super().__init__(ready, lambda: os.kill(os.getpid(), signal.SIGINT))

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        signal.signal(signal.SIGINT, self.previous)


def test_keyboard_interrupt_in_the_progress_callback_stops_the_load(smollm2_path):
    calls_after = []

    def progress(fraction):
        if calls_after:
            calls_after.append(fraction)
        if fraction > 0.1:
            calls_after.append(fraction)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llmplace.load(smollm2_path, progress=progress)
    assert len(calls_after) == 1   # llama.cpp stopped at the first "abort" answer
    with llmplace.load(smollm2_path, progress=False) as model:   # and loading works again
        assert llmplace.generate(model, "Hi", max_tokens=1, **GREEDY).tokens


def test_abort_during_prompt_processing_stops_within_one_batch(smollm2):
    with llmplace.Context(smollm2, n_ctx=1024, n_batch=512, n_ubatch=32, n_threads=1) as ctx:
        prompt = smollm2.tokenize(PROMPT)
        assert len(prompt) > 4 * 32

        with _WhenReady(lambda: _cache_length(ctx) > 0, ctx.abort), pytest.raises(AbortedError):
            ctx.decode(prompt)
        # llama.cpp checks the abort flag between graph nodes: the micro-batch running when it was set is
        # dropped, the ones before it are kept, and ctx.tokens says exactly which.
        assert 0 <= len(ctx.tokens) < len(prompt) and len(ctx.tokens) % 32 == 0
        assert ctx.tokens == prompt[:len(ctx.tokens)]
        _assert_reusable(smollm2, ctx)


def test_ctrl_c_during_prompt_processing_stops_within_one_batch(smollm2):
    # decode() hands llama.cpp n_batch tokens per call; Python raises KeyboardInterrupt between the calls.
    with llmplace.Context(smollm2, n_ctx=1024, n_batch=32, n_ubatch=32, n_threads=1) as ctx:
        prompt = smollm2.tokenize(PROMPT)
        with _SigintWhen(lambda: len(ctx.tokens) >= 32), pytest.raises(KeyboardInterrupt):
            llmplace.generate(smollm2, prompt, max_tokens=4, context=ctx, **GREEDY)
        assert 32 <= len(ctx.tokens) < len(prompt)
        assert ctx.tokens == prompt[:len(ctx.tokens)]
        _assert_reusable(smollm2, ctx)


def test_ctrl_c_during_generation_stops_and_the_context_is_reusable(smollm2):
    with llmplace.Context(smollm2, n_ctx=512, n_threads=1) as ctx:
        steps = []
        with _SigintWhen(lambda: len(steps) >= 3), pytest.raises(KeyboardInterrupt):
            for step in llmplace.stream_generate(smollm2, STORY, max_tokens=200, context=ctx, **GREEDY):
                steps.append(step)  # noqa: PERF402 - one at a time: the other thread watches len(steps)
        assert 3 <= len(steps) < 200
        _assert_reusable(smollm2, ctx)


def test_abort_during_generation_from_another_thread(smollm2):
    with llmplace.Context(smollm2, n_ctx=512, n_threads=1) as ctx:
        steps = []
        with _WhenReady(lambda: len(steps) >= 3, ctx.abort), pytest.raises(AbortedError):
            for step in llmplace.stream_generate(smollm2, STORY, max_tokens=200, context=ctx, **GREEDY):
                steps.append(step)  # noqa: PERF402 - one at a time: the other thread watches len(steps)
        assert 3 <= len(steps) < 200
        _assert_reusable(smollm2, ctx)
