"""The batching engine (llmplace.engine): every request's output equals the same request run alone.

"Alone" is `generate` on a Context of its own with the engine's thread count: one query over 512 KV cells or
more takes a kernel that splits the cells across threads, so a lone run's last bits depend on its thread count
(a plain `generate` picks it from the load average), not on batching."""

from __future__ import annotations

import asyncio
import threading

import pytest
from isolation import outcome

import llmplace
from llmplace.context import Context
from llmplace.engine import FA_TILE_ROWS, PREFILL_UNIT, exact_reuse, prefill_pieces
from llmplace.errors import (BusyError, ClosedError, ContextOverflowError, InvalidParameterError,
                             UnknownKeywordError)

THREADS = 1
STORY = "The history of the old harbour town is long and full of storms, trade and quarrels. "
SYSTEM = "<|im_start|>system\nYou are a careful assistant. " + STORY * 12 + "<|im_end|>\n"
PROMPTS = [
    "The three primary colors are",
    "def fib(n):",
    "List five fruits:\n1.",
    STORY * 8 + "In short,",        # ~145 tokens: prefilled in pieces of n_batch
    STORY * 30 + "To sum up,",      # > PREFILL_UNIT tokens: crosses a lone run's micro-batch boundary
    "Q: What is 2+2?\nA:",
]


def alone(model, prompt, **kwargs):
    n = len(model.tokenize(prompt)) if isinstance(prompt, str) else len(prompt)
    with Context(model, n_ctx=max(512, n + kwargs.get("max_tokens", 256) + 1), n_threads=THREADS) as ctx:
        return llmplace.generate(model, prompt, context=ctx, **kwargs)


def same(result, reference):
    assert (result.tokens, result.text, result.finish_reason) == (reference.tokens, reference.text,
                                                                    reference.finish_reason)


@pytest.fixture(scope="module")
def engine(smollm2):
    with llmplace.Engine(smollm2, slots=4, n_ctx=1024, n_batch=96, n_threads=THREADS) as running:
        yield running


def test_prefill_pieces_follow_a_lone_runs_micro_batches():
    assert prefill_pieces(0, 30, 512) == [30]
    assert prefill_pieces(0, 600, 512) == [PREFILL_UNIT, 600]
    pieces = prefill_pieces(0, 300, 100)
    assert pieces[-1] == 300 and all(b - a >= FA_TILE_ROWS for a, b in zip([0] + pieces, pieces))
    assert exact_reuse(100, 120) == 120 - FA_TILE_ROWS   # the rest keeps the tiled kernel's row count
    # and it keeps the row class (64, 8, 2 or 1 rows) of the lone micro-batch: 50 rows -> at least 8 left
    assert exact_reuse(40, 50) == 40 and exact_reuse(49, 50) == 42 and exact_reuse(6, 7) == 5
    assert prefill_pieces(0, 50, 4) == [8, 16, 25, 33, 41, 50] and prefill_pieces(0, 5, 1) == [2, 5]


def test_greedy_output_equals_generate_alone_with_more_requests_than_slots(engine, smollm2):
    assert len(smollm2.tokenize(PROMPTS[4])) > PREFILL_UNIT and len(PROMPTS) > engine.slots
    assert engine.batched  # the probe found a batch of rows equal to one row: steps decode all sequences at once
    handles = [engine.submit(p, max_tokens=16, temperature=0) for p in PROMPTS]
    for prompt, handle in zip(PROMPTS, handles):
        same(handle.result(timeout=120), alone(smollm2, prompt, max_tokens=16, temperature=0))
    steps = list(handles[0])  # every iteration sees every step, also after the end
    assert [s.generated_tokens for s in steps] == list(range(1, 17)) and steps[-1].finish_reason == "length"


def test_a_grammar_and_a_logits_processor_per_request_give_the_drop_in_llamas_reply(smollm2, smollm2_path):
    from llmplace.compat.llama_grammar import LlamaGrammar

    grammar = 'root ::= item (", " item)*\nitem ::= [a-z]+'
    prompt = "Three fruits, comma separated:"
    llama = llmplace.Llama(str(smollm2_path), n_ctx=512, n_threads=THREADS, verbose=False)
    try:
        reference = llama.create_completion(prompt, grammar=LlamaGrammar.from_string(grammar), max_tokens=16,
                                            temperature=0)["choices"][0]["text"]
        unconstrained = llama.create_completion(prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
        banned = smollm2.tokenize(unconstrained, add_special=False)[0]

        def ban(input_ids, scores):
            scores[banned] = -float("inf")
            return scores

        processed = llama.create_completion(prompt, logits_processor=ban, max_tokens=16,
                                            temperature=0)["choices"][0]["text"]
    finally:
        llama.close()
    with llmplace.Engine(smollm2, slots=2, n_ctx=256, flash_attn=False, n_threads=THREADS) as engine:
        constrained = engine.submit(prompt, grammar=grammar, max_tokens=16, temperature=0, keep_logits=True)
        free = engine.submit(prompt, max_tokens=16, temperature=0)   # its neighbour is not constrained
        result = constrained.result(timeout=60)
        assert result.text == reference
        assert free.result(timeout=60).text == unconstrained != reference
        rows = constrained.logits_rows  # what each token was drawn from: before the grammar masked it
        assert len(rows) == len(result.tokens) and free.logits_rows is None
        assert [int(row.argmax()) for row in rows[:1]] == free.result().tokens[:1]

        def broken(input_ids, scores):
            raise KeyError("a processor bug")

        with_ban = engine.submit(prompt, logits_processor=ban, max_tokens=16, temperature=0)
        failing = engine.submit(prompt, logits_processor=broken, max_tokens=16, temperature=0)
        assert with_ban.result(timeout=60).text == processed != unconstrained
        with pytest.raises(KeyError, match="processor bug"):
            failing.result(timeout=60)
        with pytest.raises(InvalidParameterError, match="grammar"):
            engine.submit(prompt, grammar="root ::= undefined_rule")


def test_a_mixture_of_experts_decodes_each_sequence_alone_and_stays_equal(tiny_qwen3moe_path):
    with llmplace.load(tiny_qwen3moe_path, progress=False) as moe:
        prompts = ["def fib(n):", "The three primary colors are", STORY * 3, "Q: What is 2+2?\nA:"]
        with llmplace.Engine(moe, slots=3, n_ctx=512, n_batch=40, n_threads=THREADS) as engine:
            assert not engine.batched  # a batch routes several sequences' rows to the experts together
            handles = [engine.submit(p, max_tokens=24, temperature=0) for p in prompts]
            for prompt, handle in zip(prompts, handles):
                same(handle.result(timeout=120), alone(moe, prompt, max_tokens=24, temperature=0))


def test_generate_batch_equals_generate(smollm2):
    prompts = PROMPTS[:3]
    results = llmplace.generate_batch(smollm2, prompts, max_tokens=12, temperature=0, n_threads=THREADS)
    for prompt, result in zip(prompts, results):
        same(result, alone(smollm2, prompt, max_tokens=12, temperature=0))


def test_seeded_sampling_and_stop_strings_are_per_request(engine, smollm2):
    full = alone(smollm2, PROMPTS[0], max_tokens=40, temperature=0).text
    stop = full[12:16]
    options = [dict(temperature=0.9, seed=7), dict(temperature=0.9, seed=8), dict(temperature=0, stop=[stop]),
               dict(temperature=0.7, top_k=20, seed=3)]
    handles = [engine.submit(PROMPTS[0], max_tokens=24, **o) for o in options]
    results = [h.result(timeout=120) for h in handles]
    for result, o in zip(results, options):
        same(result, alone(smollm2, PROMPTS[0], max_tokens=24, **o))
    assert results[2].finish_reason == "stop" and results[2].text == full[:full.find(stop)]
    assert results[0].tokens != results[1].tokens  # the seeds differ, so do the draws


def test_a_shared_prefix_is_copied_and_gives_the_same_output(engine, smollm2):
    first = engine.submit(SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
                          max_tokens=40, temperature=0)
    next(iter(first))  # running: its cache holds the system prompt
    prompt = SYSTEM + "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    second = engine.submit(prompt, max_tokens=12, temperature=0)
    steps = list(second)
    assert steps[0].prompt_cached > 100, "the system prompt was computed again"
    same(second.result(), alone(smollm2, prompt, max_tokens=12, temperature=0))
    first.result(timeout=120)


def test_cancel_frees_the_slot(smollm2):
    with llmplace.Engine(smollm2, slots=1, n_ctx=512, n_threads=THREADS) as one:
        long = one.submit(PROMPTS[0], max_tokens=400, temperature=0)
        waiting = one.submit(PROMPTS[1], max_tokens=400, temperature=0)
        later = one.submit(PROMPTS[2], max_tokens=8, temperature=0)
        stream = iter(long)
        next(stream), next(stream)
        assert one.occupancy() == (1, 2)
        waiting.cancel()                                   # leaves the queue at once
        assert waiting.result(timeout=5).finish_reason == "cancelled" and waiting.result().tokens == []
        long.cancel()                                      # ends at the next step
        cancelled = long.result(timeout=60)
        assert cancelled.finish_reason == "cancelled" and 2 <= len(cancelled.tokens) < 400
        same(later.result(timeout=60), alone(smollm2, PROMPTS[2], max_tokens=8, temperature=0))
        long.cancel()  # once ended, nothing happens


def test_threads_each_see_every_step_and_exact_false_batches_always(engine, smollm2):
    handle = engine.submit(PROMPTS[2], max_tokens=12, temperature=0)
    seen = [None, None]

    def read(i):
        seen[i] = [step.token for step in handle]

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert seen[0] == seen[1] == handle.result().tokens and len(seen[0]) == 12
    with llmplace.Engine(smollm2, slots=2, n_ctx=256, exact=False, n_threads=THREADS) as fast:
        assert fast.batched
        results = [h.result(timeout=60) for h in [fast.submit(p, max_tokens=6, temperature=0) for p in PROMPTS[:3]]]
        assert [len(r.tokens) for r in results] == [6, 6, 6]
        again = fast.submit(PROMPTS[2], max_tokens=2, temperature=0)  # the last one run: still cached
        assert next(iter(again)).prompt_cached == len(smollm2.tokenize(PROMPTS[2])) - 1  # all but the last token


def test_asyncio_streams_and_awaits(engine, smollm2):
    async def main():
        streamed = engine.submit(PROMPTS[0], max_tokens=10, temperature=0)
        awaited = engine.submit(PROMPTS[1], max_tokens=10, temperature=0)
        texts = [step.text async for step in streamed]
        return "".join(texts), await awaited

    text, result = asyncio.run(main())
    assert text == alone(smollm2, PROMPTS[0], max_tokens=10, temperature=0).text
    same(result, alone(smollm2, PROMPTS[1], max_tokens=10, temperature=0))


def test_bad_arguments_raise_typed_errors(engine, smollm2):
    with pytest.raises(UnknownKeywordError, match="temperature"):
        engine.submit("Hi", temprature=0)
    with pytest.raises(InvalidParameterError, match="draft"):
        engine.submit("Hi", draft="lookup")
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        engine.submit("Hi", max_tokens=-1)
    with pytest.raises(InvalidParameterError, match="empty"):
        engine.submit("")
    with pytest.raises(ContextOverflowError):
        engine.submit(list(range(100, 100 + engine.n_ctx)))
    for kwargs in (dict(slots=0), dict(n_ctx="big"), dict(n_batch=0), dict(extra_params={"kv_unified": True}),
                   dict(temperature=0), dict(n_seq_max=2), dict(exact="yes"), dict(n_ubatch_typo=1)):
        with pytest.raises(InvalidParameterError):
            llmplace.Engine(smollm2, **kwargs)
    with llmplace.Engine(smollm2, slots=1, n_ctx=256, max_queue=1, n_threads=THREADS) as small:
        running = small.submit(PROMPTS[0], max_tokens=200, temperature=0)  # 16+ tokens, no stop
        next(iter(running))                                 # admitted: the queue is empty again
        small.submit("Hello", max_tokens=1)
        with pytest.raises(BusyError, match="max_queue"):
            small.submit("Hey", max_tokens=1)
    with pytest.raises(ClosedError):
        small.submit("Hi")


def test_context_sequence_methods_check_what_llama_cpp_would_abort_on(smollm2_path):
    """In a process of its own: a check that let a value through would abort it."""
    result = outcome(f"""
        model = llmplace.load({str(smollm2_path)!r}, progress=False)
        ctx = llmplace.Context(model, n_ctx=512, n_seq_max=2, extra_params={{"kv_unified": False}})
        t = model.tokenize("Hello world")
        cases = [lambda: ctx.decode_batch([(2, t[0], 0, True)]),          # seq_id >= n_seq_max
                 lambda: ctx.decode_batch([(0, t[0], 1, True)]),          # a gap in the positions
                 lambda: ctx.decode_batch([(0, t[0], 0, True), (0, t[1], 0, True)]),
                 lambda: ctx.decode_batch([(0, 10**9, 0, True)]),         # not a token
                 lambda: ctx.decode_batch([]),
                 lambda: ctx.decode_batch([(0, t[0], i, False) for i in range(ctx.n_batch + 1)]),
                 lambda: ctx.decode_batch([(0, t[0], 600, True)]),
                 lambda: ctx.copy_sequence(1, 1, 0), lambda: ctx.copy_sequence(0, 5, 0),
                 lambda: ctx.copy_sequence(0, 1, 3), lambda: ctx.remove_sequence(-1),
                 lambda: ctx.truncate_sequence(7, 0)]
        kinds = []
        for case in cases:
            try:
                case()
                kinds.append("ok")
            except LlmplaceError as exc:
                kinds.append(type(exc).__name__)
        outputs = ctx.decode_batch([(0, t[0], 0, False), (1, t[0], 0, False), (0, t[1], 1, True), (1, t[1], 1, True)])
        assert outputs == [2, 3] and ctx.tokens == t[:2] and ctx.sequence_length(1) == 2
        assert ctx.copy_sequence(1, 0, 1, tokens=t) == 1 and ctx.tokens == t[:1] and ctx.sequence_length(0) == 1
        ctx.remove_sequence(1)
        assert ctx.sequence_length(1) == 0
        report("typed" if "ok" not in kinds else "untyped", message=" ".join(kinds))
    """, timeout=120)
    assert result.kind == "typed", str(result)


def test_close_while_requests_run_ends_them_with_closed_error(smollm2_path):
    result = outcome(f"""
        model = llmplace.load({str(smollm2_path)!r}, progress=False)
        engine = llmplace.Engine(model, slots=2, n_ctx=512, n_threads=1)
        handles = [engine.submit("Once upon a time", max_tokens=300, temperature=0) for _ in range(3)]
        next(iter(handles[0]))
        engine.close()
        errors = []
        for handle in handles:
            try:
                handle.result(timeout=30)
                errors.append("none")
            except LlmplaceError as exc:
                errors.append(type(exc).__name__)
        second = llmplace.Engine(model, slots=2, n_ctx=512, n_threads=1)
        running = second.submit("Once upon a time", max_tokens=300, temperature=0)
        next(iter(running))
        model.close()                              # closes the engine's context under it
        expect_typed(lambda: (errors, running.result(timeout=30)) if errors == ["ClosedError"] * 3 else errors)
    """, timeout=120)
    assert result.kind == "typed" and result.error == "ClosedError", str(result)
