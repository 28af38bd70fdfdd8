"""Model loading, metadata, vocabulary, progress callbacks, lifetime."""

from __future__ import annotations

import gc
import io
import logging
import re

import psutil
import pytest

import llmplace
from llmplace import AbortedError
from llmplace.progress import TerminalProgressBar


def test_metadata(smollm2):
    assert smollm2.arch == "llama"
    assert smollm2.n_layer == 30
    assert smollm2.n_embd == 576
    assert smollm2.n_ctx_train == 8192
    assert 130e6 < smollm2.n_params < 140e6
    assert 60e6 < smollm2.size < smollm2_file_size(smollm2)
    md = smollm2.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == "30"
    assert "<|im_start|>" in smollm2.chat_template
    assert "llama" in smollm2.description


def smollm2_file_size(model) -> int:
    return model.path.stat().st_size


def test_vocab_special_tokens(smollm2):
    vocab = smollm2.vocab
    assert vocab.n_tokens == 49152
    assert vocab.eos is not None and vocab.is_eog(vocab.eos)
    assert vocab.token_text(vocab.eos) == "<|im_end|>"
    assert smollm2.tokenize("<|im_start|>", add_special=False, parse_special=True) == [vocab.bos or 1]
    assert len(smollm2.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1


def test_progress_callback_sees_monotonic_fractions_up_to_one(smollm2_path):
    seen = []
    with llmplace.load(smollm2_path, progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)


def test_progress_callback_returning_false_cancels(smollm2_path):
    with pytest.raises(AbortedError, match="cancelled"):
        llmplace.load(smollm2_path, progress=lambda f: f < 0.3)


def test_exception_in_progress_callback_is_reraised(smollm2_path):
    class Boom(Exception):
        pass

    def callback(fraction):
        if fraction > 0.2:
            raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        llmplace.load(smollm2_path, progress=callback)


def test_terminal_progress_bar_appears_only_for_slow_loads():
    stream = io.StringIO()
    quick = TerminalProgressBar(delay=60, stream=stream)
    for f in (0.0, 0.5, 1.0):
        quick(f)
    assert stream.getvalue() == ""
    slow = TerminalProgressBar(delay=0, stream=stream)
    for f in (0.0, 0.5, 1.0):
        slow(f)
    assert "100.0%" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_native_log_goes_to_logging(smollm2_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="llmplace"):
        with llmplace.load(smollm2_path, progress=False):
            pass
    native = [r for r in caplog.records if r.name == "llmplace.native"]
    assert any("llama" in r.getMessage() for r in native)


def test_context_parameters_are_applied(smollm2):
    with llmplace.Context(smollm2, n_ctx=1024, n_batch=256, n_ubatch=128, n_threads=1, flash_attn=False,
                          type_k="q8_0", type_v="f16") as ctx:
        assert ctx.n_ctx == 1024
        assert ctx.n_batch == 256
        assert ctx.n_ubatch == 128
        assert ctx.n_threads == 1
        ctx.decode(smollm2.tokenize("Hello there, how are you?"))
        logits = ctx.logits()
        assert logits.shape == (smollm2.n_vocab,)


def test_batched_decode_splits_long_prompts_by_n_batch(smollm2):
    tokens = smollm2.tokenize("one two three four five six seven eight nine ten " * 8)
    assert len(tokens) > 3 * 16
    # Same micro-batch size, so the same kernels run: splitting the prompt into decode calls of n_batch
    # tokens must give what one call gives.
    with llmplace.Context(smollm2, n_ctx=512, n_batch=16, n_ubatch=16) as small, \
            llmplace.Context(smollm2, n_ctx=512, n_batch=512, n_ubatch=16) as large:
        small.decode(tokens)
        large.decode(tokens)
        assert small.tokens == large.tokens == tokens
        assert abs(small.logits() - large.logits()).max() < 1e-3


def test_no_leak_across_100_load_close_cycles(smollm2_path):
    process = psutil.Process()

    def cycle():
        with llmplace.load(smollm2_path, progress=False) as model, llmplace.Context(model, n_ctx=256) as ctx:
            ctx.decode(model.tokenize("Hello"))

    for _ in range(10):  # warm up allocator pools and caches
        cycle()
    gc.collect()
    before = process.memory_info().rss
    for _ in range(100):
        cycle()
    gc.collect()
    growth = process.memory_info().rss - before
    print(f"RSS growth over 100 load/close cycles: {growth / 2**20:.1f} MiB")
    # A leaked model would be ~100 MB per cycle (mmap'd weights) and a leaked context several MB.
    assert growth < 32 * 2**20


def test_objects_freed_by_garbage_collection(smollm2_path):
    model = llmplace.load(smollm2_path, progress=False)
    ctx = llmplace.Context(model, n_ctx=128)
    finalizers = (model._finalizer, ctx._finalizer)
    del model, ctx
    gc.collect()
    assert not any(f.alive for f in finalizers)


def test_kv_overrides_change_what_llama_cpp_reads(smollm2_path):
    overrides = {"llama.context_length": 2048, "tokenizer.ggml.add_bos_token": True,
                 "llama.attention.layer_norm_rms_epsilon": 1}  # an int for a float key is taken as a float
    with llmplace.load(smollm2_path, progress=False, kv_overrides=overrides) as model:
        assert model.n_ctx_train == 2048
        assert model.tokenize("hi")[0] == model.vocab.bos
    with llmplace.load(smollm2_path, progress=False) as model:
        assert model.n_ctx_train == 8192 and model.tokenize("hi")[0] != model.vocab.bos


@pytest.mark.parametrize("overrides,fragment", [
    ({"llama.context_length": "2048"}, "is of type str, but the file's llama.context_length is of type int"),
    ({"k" * 128: 1}, "1 to 127 bytes"),
    ({"llama.context_length": [1]}, "is of type list"),
    ({"no.such.key": [1]}, "must be a bool, a 64-bit int"),
    ({"general.name": "x" * 200}, "under 128 bytes"),
    ({"llama.context_length": 1 << 64}, "64-bit int"),
    ([("llama.context_length", 1)], "must be a dict"),
])
def test_bad_kv_overrides_are_refused_before_loading(smollm2_path, smollm2, overrides, fragment):
    with pytest.raises(llmplace.InvalidParameterError, match=re.escape(fragment)):
        llmplace.load(smollm2_path, progress=False, kv_overrides=overrides)
    assert smollm2.tokenize("still alive")
