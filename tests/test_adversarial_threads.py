"""Lifetimes across threads (issue 17, class 5): close() of a Context, Model, Chat or Llama from another thread
while a generation runs; views kept after close; embeddings past the last decode's outputs; streams abandoned and
collected in another thread; generators interleaved on one context; a second thread's Llama or Chat call while
the first one generates; `llmplace serve` stopped by Ctrl-C during a stream.

These failed with SIGSEGV (or left a context locked, or produced wrong text), so every case runs in a separate
interpreter (tests/adversarial.py): a crash or a hang fails its own case. A case is a function in CASES below; it
runs its scenario several times (races), asserts what must hold (an AssertionError shows as "untyped") and
returns a tally of the typed errors and successes it saw. SmolLM2 with one thread, short generations.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from adversarial import outcomes
from isolation import outcome
from processes import free_port

SETUP = r'''
import gc, os, threading, time
import numpy as np
from llmplace import Chat, Context, Llama, generate, load, stream_generate
from llmplace.compat import LogitsProcessorList
from llmplace.errors import BusyError, ClosedError, InvalidParameterError
from llmplace.sampling import Sampler, SamplingParams

PATH = os.environ["ADV_MODEL"]
STORY = "Once upon a time, in a small village,"
NO_END = {0: -100.0, 2: -100.0}   # SmolLM2's end tokens banned: a reply runs to max_tokens
LONG = dict(max_tokens=160, temperature=0, logit_bias=NO_END)
model = load(PATH, progress=False)
tally = {"typed": 0, "ok": 0}


def run(fn):
    """fn()'s outcome: "ok" or the name of the LlmplaceError it raised (counted); anything else fails the case."""
    try:
        fn()
    except (BusyError, ClosedError, InvalidParameterError, llmplace.LlmplaceError) as exc:
        tally["typed"] += 1
        return type(exc).__name__
    tally["ok"] += 1
    return "ok"


def in_thread(fn):
    """Start fn() in a thread; .result() joins it (30 s at most) and returns run(fn)'s outcome."""
    box = {}
    def target():
        try:
            box["outcome"] = run(fn)
        except BaseException as exc:  # an untyped error: reported by result()
            box["outcome"] = f"UNTYPED {type(exc).__name__}: {exc}"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    def result():
        thread.join(30)
        assert not thread.is_alive(), "the worker hangs"
        return box["outcome"]
    thread.result = result
    return thread


def wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.0005)


def done():
    """The case's tally (and a fresh one for the next case)."""
    out = json.dumps(tally)
    tally.update(typed=0, ok=0)
    return out


def close_during_generation(make, start, progress, close, again, rounds=5):
    """`rounds` times: make() an object, start(obj) a generation in a thread, close(obj) once progress(obj)
    passes a point (later each round, round 0 inside the prompt's decode), then check the worker ended with
    ClosedError (or finished first) and that a new call raises ClosedError."""
    for i in range(rounds):
        obj = make()
        worker = in_thread(lambda: start(obj))
        wait_until(lambda: progress(obj) > (0 if i == 0 else 8 + 6 * i) or not worker.is_alive())
        close(obj)
        outcome = worker.result()
        assert outcome in ("ClosedError", "ok"), outcome
        assert run(lambda: again(obj)) == "ClosedError"
    return done()


def prompt_tokens(text, n):
    tokens = model.tokenize(text)
    return (tokens * (n // len(tokens) + 1))[:n]


PROMPT_200 = prompt_tokens("The cat sat on the mat and looked at the sea. ", 200)


def context_generation(stream):
    def start(ctx):
        if stream:
            for _ in stream_generate(model, PROMPT_200, context=ctx, **LONG):
                pass
        else:
            generate(model, PROMPT_200, context=ctx, **LONG)
    return close_during_generation(
        lambda: Context(model, n_ctx=512, n_batch=32, n_ubatch=32, n_threads=1), start,
        lambda ctx: len(ctx.tokens), lambda ctx: ctx.close(),
        lambda ctx: generate(model, "Hi", max_tokens=2, context=ctx))


def model_generation():
    global model
    def make():
        m = load(PATH, progress=False)
        return m, Context(m, n_ctx=512, n_batch=32, n_ubatch=32, n_threads=1)
    def start(pair):
        m, ctx = pair
        for _ in stream_generate(m, PROMPT_200, context=ctx, **LONG):
            pass
    return close_during_generation(make, start, lambda pair: len(pair[1].tokens), lambda pair: pair[0].close(),
                                   lambda pair: pair[0].tokenize("Hi"))


def chat_reply():
    return close_during_generation(
        lambda: Chat(model, "Be brief.", n_ctx=512, n_threads=1, **LONG), lambda chat: chat.submit(STORY),
        lambda chat: chat.n_cached, lambda chat: chat.close(), lambda chat: chat.submit("Hi"))


def llama_completion():
    llamas = []
    def make():
        llm = Llama(PATH, n_ctx=512, n_batch=32, n_threads=1, verbose=False)
        llamas.append(llm)
        return llm
    def start(llm):
        kind = len(llamas) % 3   # plain, streamed, with a logits processor (llmplace's own loop)
        prompt = model.detokenize(PROMPT_200)
        if kind == 1:
            for _ in llm(prompt, max_tokens=160, temperature=0, logit_bias=NO_END, stream=True):
                pass
        elif kind == 2:
            llm(prompt, max_tokens=160, temperature=0, logit_bias=NO_END,
                logits_processor=LogitsProcessorList([lambda ids, scores: scores]))
        else:
            llm(prompt, max_tokens=160, temperature=0, logit_bias=NO_END)
    return close_during_generation(make, start, lambda llm: llm.n_tokens, lambda llm: llm.close(),
                                   lambda llm: llm("Hi", max_tokens=2))


def close_inside_a_callback():
    """A logits processor closing its own Llama: BusyError (waiting for itself would hang), Llama usable after."""
    llm = Llama(PATH, n_ctx=256, n_threads=1, verbose=False)
    seen = []
    def processor(ids, scores):
        seen.append(run(llm.close))
        return scores
    assert run(lambda: llm("Hello", max_tokens=2, temperature=0, logits_processor=processor)) == "ok"
    assert seen and set(seen) == {"BusyError"}, seen
    assert run(lambda: llm("Hello", max_tokens=2, temperature=0)) == "ok"
    llm.close()
    return done()


def samplers_and_grammars_closed_in_use():
    """A Sampler or a grammar constraint closed by another thread while one draws: ClosedError, never a crash."""
    from llmplace.compat.llama_grammar import GrammarConstraint
    ctx = Context(model, n_ctx=64, n_threads=1)
    ctx.decode(model.tokenize("Hello"))
    logits = ctx.logits()
    for i in range(5):
        sampler = Sampler(model.n_vocab, SamplingParams(temperature=0.8, seed=i))
        worker = in_thread(lambda: [sampler.sample(ctx) for _ in range(100000)])
        time.sleep(0.002 * i)
        sampler.close()
        assert worker.result() == "ClosedError"
        grammar = GrammarConstraint(model, 'root ::= "yes" | "no"')
        worker = in_thread(lambda: [grammar.apply(logits.copy()) for _ in range(100000)])
        time.sleep(0.002 * i)
        grammar.close()
        assert worker.result() == "ClosedError"
    ctx.close()
    return done()


def views_after_close():
    """Logits and embeddings are copies (or refused): what was read stays readable after close; rows past the
    last decode's outputs are refused."""
    ctx = Context(model, n_ctx=128, n_threads=1)
    ctx.decode(model.tokenize("The capital of France is"))
    logits = ctx.logits()
    snapshot = logits.copy()
    assert logits.flags.owndata
    assert run(lambda: ctx.logits(copy=False)) == "InvalidParameterError"
    assert run(lambda: ctx.set_logits([1.0, 2.0])) == "InvalidParameterError"
    ctx.close()
    assert (logits == snapshot).all()
    assert run(ctx.logits) == "ClosedError"

    ectx = Context(model, n_ctx=256, n_batch=16, n_ubatch=16, n_threads=1, extra_params={"embeddings": True})
    assert run(lambda: ectx.embeddings(1)) == "InvalidParameterError"   # nothing decoded yet
    ectx.decode(prompt_tokens("one two three four ", 40))   # 16 + 16 + 8: the last decode outputs 8 rows
    rows = ectx.embeddings(8)
    assert rows.shape == (8, model.n_embd) and rows.flags.owndata
    assert np.array_equal(ectx.embeddings(1)[0], rows[-1])
    for bad in (9, 40, 200_000, 2**40, 0, -1, "3", 2.5, None):
        assert run(lambda: ectx.embeddings(bad)) in ("InvalidParameterError",), bad
    kept = rows.copy()
    ectx.close()
    assert (rows == kept).all()
    assert run(lambda: ectx.embeddings(1)) == "ClosedError"

    # The drop-in's logits processors get copies too: what one keeps stays valid after the Llama is closed.
    llm = Llama(PATH, n_ctx=256, n_threads=1, verbose=False)
    kept_scores = []
    def keep(ids, scores):
        kept_scores.append(scores)
        return scores
    llm("The capital of France is", max_tokens=4, temperature=0, logits_processor=keep)
    snapshots = [s.copy() for s in kept_scores]
    llm.close()
    assert kept_scores and all(s.flags.owndata for s in kept_scores)
    assert all((s == c).all() for s, c in zip(kept_scores, snapshots))
    return done()


def abandoned_streams():
    """Streams started (or only created) in one thread and dropped in another give the context back."""
    ctx = Context(model, n_ctx=256, n_threads=1)
    expected = generate(model, "Hello there", max_tokens=4, temperature=0, context=ctx).tokens
    for started in (True, False):
        for make in (lambda: stream_generate(model, "Tell me a story", context=ctx, **LONG),
                     lambda: Chat(model, n_ctx=256, n_threads=1, **LONG).stream("Tell me a story"),
                     lambda: llm("Tell me a story", max_tokens=50, stream=True)):
            llm = Llama(PATH, n_ctx=256, n_threads=1, verbose=False)
            holder = []
            def begin():
                stream = make()
                if started:
                    next(stream)
                holder.append(stream)
            assert in_thread(begin).result() == "ok"
            assert in_thread(lambda: (holder.clear(), gc.collect())).result() == "ok"
            assert generate(model, "Hello there", max_tokens=4, temperature=0, context=ctx).tokens == expected
            assert run(lambda: llm("Hello", max_tokens=2)) == "ok"
            llm.close()
    ctx.close()
    return done()


def interleaved_generators():
    """A second generation on a context while a first is suspended, same thread: BusyError, first unharmed."""
    ctx = Context(model, n_ctx=256, n_threads=1)
    prompt = "The three primary colors are"
    expected = generate(model, prompt, max_tokens=12, temperature=0, context=ctx).tokens
    ctx.clear()
    for second in (lambda: stream_generate(model, "Other text", max_tokens=4, context=ctx),
                   lambda: generate(model, "Other text", max_tokens=4, context=ctx)):
        first = stream_generate(model, prompt, max_tokens=12, temperature=0, context=ctx)
        tokens = [next(first).token]
        assert run(second) == "BusyError"
        tokens += [step.token for step in first]
        assert tokens == expected, (tokens, expected)
    llm = Llama(PATH, n_ctx=256, n_threads=1, verbose=False)
    reference = llm(prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    for second in (lambda: llm("Other", max_tokens=3), lambda: llm("Other", max_tokens=3, stream=True),
                   lambda: next(llm.generate(llm.tokenize(b"Other"), temp=0)),
                   lambda: llm("Other", max_tokens=3, logits_processor=lambda ids, s: s)):
        stream = llm(prompt, max_tokens=12, temperature=0, stream=True)
        text = next(stream)["choices"][0]["text"]
        assert run(second) == "BusyError"
        text += "".join(chunk["choices"][0]["text"] for chunk in stream)
        assert text == reference, (text, reference)
    llm.close()
    ctx.close()
    return done()


def second_thread_callers():
    """Another thread's Llama (with processors), Context or Chat call during a generation: BusyError at once,
    and the first call's output is what it is alone."""
    llm = Llama(PATH, n_ctx=256, n_threads=1, verbose=False)
    prompt = "The three primary colors are"
    reference = llm(prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    for _ in range(3):
        stream = llm(prompt, max_tokens=12, temperature=0, stream=True)
        text = next(stream)["choices"][0]["text"]
        for call in (lambda: llm("Other", max_tokens=4, logits_processor=LogitsProcessorList([lambda i, s: s])),
                     lambda: llm("Other", max_tokens=4), llm.reset, lambda: llm.eval([1, 2]),
                     lambda: llm.save_state(), lambda: llm.llmplace_context.clear(),
                     lambda: llm.llmplace_context.logits()):
            assert in_thread(call).result() == "BusyError"
        text += "".join(chunk["choices"][0]["text"] for chunk in stream)
        assert text == reference, (text, reference)
    llm.close()

    chat = Chat(model, "Be brief.", n_ctx=512, n_threads=1, max_tokens=12, temperature=0)
    alone = Chat(model, "Be brief.", n_ctx=512, n_threads=1, max_tokens=12, temperature=0).submit("Hello!").text
    for _ in range(3):
        stream = chat.stream("Hello!")
        text = next(stream)
        for call in (lambda: chat.submit("Other"), chat.reset, lambda: chat.load_history([]),
                     lambda: list(chat.stream("Other"))):
            assert in_thread(call).result() == "BusyError"
        text += "".join(stream)
        assert text == alone, (text, alone)
        assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
        chat.reset()
    chat.close()
    return done()
'''

CASES = {
    "close_context_during_generate": "context_generation(stream=False)",
    "close_context_during_stream": "context_generation(stream=True)",
    "close_model_during_stream": "model_generation()",
    "close_chat_during_reply": "chat_reply()",
    "close_llama_during_completion": "llama_completion()",
    "close_inside_a_callback": "close_inside_a_callback()",
    "samplers_and_grammars_closed_in_use": "samplers_and_grammars_closed_in_use()",
    "views_after_close": "views_after_close()",
    "abandoned_streams": "abandoned_streams()",
    "interleaved_generators": "interleaved_generators()",
    "second_thread_callers": "second_thread_callers()",
}


@pytest.fixture(scope="module")
def results(smollm2_path):
    return outcomes("import llmplace\n" + SETUP, CASES, timeout=120, env={"ADV_MODEL": str(smollm2_path)})


@pytest.mark.parametrize("case", list(CASES))
def test_threads_case(results, case):
    outcome = results[case]
    assert outcome.kind == "ok", str(outcome)
    tally = json.loads(eval(outcome.message))  # noqa: S307 - the case's own repr of its tally
    assert tally["typed"] + tally["ok"] > 0


def test_counts(results, capsys):
    kinds = [o.kind for o in results.values()]
    tallies = [json.loads(eval(o.message)) for o in results.values() if o.kind == "ok"]  # noqa: S307
    with capsys.disabled():
        print(f"\nthreads: {len(kinds)} cases, {sum(t['typed'] for t in tallies)} typed errors, "
              f"{sum(t['ok'] for t in tallies)} successful calls, {kinds.count('crash')} crashes, "
              f"{kinds.count('hang')} hangs")
    assert kinds.count("crash") == 0 and kinds.count("hang") == 0


@pytest.mark.parametrize("what", ["generate", "stream", "prompt"])
def test_interpreter_exit_while_a_daemon_thread_generates(smollm2_path, what):
    """The interpreter exits (nothing closed) while a daemon thread is decoding: the exit frees the context only
    once that decode has stopped, never under it."""
    result = outcome(f"""
        import os, threading, time
        from llmplace import Context, generate, load, stream_generate
        model = load(os.environ["ADV_MODEL"], progress=False)
        ctx = Context(model, n_ctx=1024, n_batch=32, n_ubatch=32, n_threads=1)
        prompt = model.tokenize("The cat sat on the mat. " * 80) if "{what}" == "prompt" else "Once upon a time"
        def work():
            if "{what}" == "stream":
                for _ in stream_generate(model, prompt, context=ctx, max_tokens=300, logit_bias={{0: -100, 2: -100}}):
                    pass
            else:
                generate(model, prompt, context=ctx, max_tokens=300, logit_bias={{0: -100, 2: -100}})
        threading.Thread(target=work, daemon=True).start()
        while len(ctx.tokens) < (40 if "{what}" == "prompt" else 12):
            time.sleep(0.001)
        report("ok")
    """, env={"ADV_MODEL": str(smollm2_path)}, timeout=60)
    assert result.kind == "ok" and result.returncode == 0, str(result)


# ---- llmplace serve stopped by Ctrl-C during a stream ----
def _connect(port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("attempt", range(3))
def test_serve_survives_ctrl_c_during_a_stream(smollm2_path, attempt):
    port = free_port()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "serve", str(smollm2_path), "--port", str(port),
                                "--threads", "1", "--n-ctx", "512"], stdout=subprocess.DEVNULL, stderr=log,
                               cwd=tempfile.gettempdir())
    try:
        with _connect(port, time.monotonic() + 60) as sock:
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "temperature": 0,
                               "logit_bias": {"0": -100, "2": -100}}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while received.count(b"data: ") < 2 + attempt * 4:   # a few tokens in, later each attempt
                chunk = sock.recv(65536)
                assert chunk, "the server closed the stream early"
                received += chunk
            process.send_signal(signal.SIGINT)
            rc = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.seek(0)
    assert rc == 0, f"llmplace serve ended with {rc} after Ctrl-C: {log.read().decode(errors='replace')[-2000:]}"
