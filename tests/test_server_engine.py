"""`llmplace serve --slots N`: requests decoded together on the batching engine, against real server processes
(SmolLM2, 127.0.0.1, raw http.client): each reply equals the same request served alone by the Llama, a full
queue answers 429 with Retry-After, /health and /metrics, a client that leaves frees its slot, and a bounded
load test (32 clients, random disconnects, slow readers): zero errors for the well-behaved clients, their
replies equal the lone ones, no slot leaked, RSS growth bounded.

Each server runs in its own process (a crash is a failed request and a dead process, asserted at the end)."""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
from processes import free_port, stop

import llmplace

THREADS = 1
N_CTX = 1024
SMOLLM2_EOS = {"0": -100, "2": -100}  # logit_bias banning SmolLM2's end tokens: a reply runs to its max_tokens
PROMPTS = ["Once upon a time", "The three primary colors are", "def fib(n):", "List five fruits:\n1.",
           "Q: What is the capital of France?\nA:", "In 1969, the first"]
CHATS = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Name a color."}]]
RSS_BOUND_MIB = 48  # server RSS growth allowed over the load test (measured: see test_load)


def start(model_path, *extra) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmplace.cli", "serve", str(model_path), "--port", str(port), "--threads",
         str(THREADS), "--n-ctx", str(N_CTX), *extra],
        stdout=subprocess.DEVNULL, stderr=log, cwd=tempfile.gettempdir())  # outside the checkout (no compiled module)
    process.log = log
    deadline = time.monotonic() + 60
    while True:
        try:
            get(port, "/health")
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                raise AssertionError(f"the server did not start: {log.read().decode(errors='replace')[-3000:]}") \
                    from None
            time.sleep(0.2)


def finish(process: subprocess.Popen) -> None:
    alive = process.poll() is None
    stop(process)
    process.log.seek(0)
    assert alive, f"the server died: {process.log.read().decode(errors='replace')[-3000:]}"


def get(port: int, path: str) -> tuple[int, bytes, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def health(port: int) -> dict:
    return json.loads(get(port, "/health")[1])


def post(port: int, route: str, body: dict, *, slow: float = 0.0) -> tuple[int, dict | list, dict]:
    """POST; a JSON reply, or for a stream the list of its events' dicts (ending with "[DONE]"). slow: seconds
    to sleep before reading each line (a slow reader)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        headers = dict(response.getheaders())
        if not body.get("stream") or response.status != 200:
            return response.status, json.loads(response.read()), headers
        events = []
        while line := (time.sleep(slow), response.readline())[1]:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return response.status, events, headers
    finally:
        connection.close()


def streamed_text(events: list, route: str) -> str:
    assert events[-1] == "[DONE]", events[-3:]
    if route == "/v1/chat/completions":
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    return "".join(e["choices"][0]["text"] for e in events[:-1])


def reply_text(reply: dict, route: str) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if route == "/v1/chat/completions" else choice["text"]


def wait_idle(port: int, seconds: float = 15) -> dict:
    """/health once no slot is busy and nothing waits (AssertionError after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        state = health(port)
        if state["slots_busy"] == 0 and state["queue_depth"] == 0 and not state["busy"]:
            return state
        assert time.monotonic() < deadline, f"slots still busy: {state}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def alone(smollm2_path):
    """The reply each request gets served alone by the Llama on a fresh context, by (route, index, max_tokens,
    options)."""
    cache = {}
    with llmplace.Llama(str(smollm2_path), verbose=False, n_threads=THREADS, n_ctx=N_CTX) as llama:
        def expected(route: str, index: int, max_tokens: int, **options) -> str:
            key = (route, index, max_tokens, json.dumps(options, sort_keys=True))
            if key not in cache:
                llama.reset()  # alone: no prefix of an earlier prompt reused (that may change near-ties)
                if route == "/v1/chat/completions":
                    reply = llama.create_chat_completion(CHATS[index], max_tokens=max_tokens, temperature=0,
                                                         **options)
                else:
                    reply = llama(PROMPTS[index], max_tokens=max_tokens, temperature=0, **options)
                cache[key] = reply_text(reply, route)
            return cache[key]

        # computed now: the Llama is closed after this fixture's setup
        for route, count in (("/v1/completions", len(PROMPTS)), ("/v1/chat/completions", len(CHATS))):
            for index in range(count):
                for max_tokens in (6, 12):
                    expected(route, index, max_tokens)
                    expected(route, index, max_tokens, logit_bias=SMOLLM2_EOS)
        expected("/v1/completions", 0, 12, repeat_penalty=1.3)
    return lambda route, index, max_tokens, **options: cache[(route, index, max_tokens,
                                                              json.dumps(options, sort_keys=True))]


@pytest.fixture(scope="module")
def server(smollm2_path):
    process, port = start(smollm2_path, "--slots", "4", "--max-queue", "64")
    yield port
    finish(process)


def body_for(route: str, index: int, max_tokens: int, stream: bool, **options) -> dict:
    what = {"messages": CHATS[index]} if route == "/v1/chat/completions" else {"prompt": PROMPTS[index]}
    return {**what, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **options}


def test_concurrent_replies_equal_each_request_served_alone(server, alone):
    jobs = [(route, index, stream) for route, count in (("/v1/completions", len(PROMPTS)),
                                                         ("/v1/chat/completions", len(CHATS)))
            for index in range(count) for stream in (False, True)]
    results = {}
    sampled = []

    def run(job):
        route, index, stream = job
        results[job] = post(server, route, body_for(route, index, 12, stream))

    def sample():
        while len(results) < len(jobs):
            sampled.append(health(server)["slots_busy"])
            time.sleep(0.02)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs] + [threading.Thread(target=sample)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (route, index, stream), (status, reply, _) in results.items():
        assert status == 200, reply
        text = streamed_text(reply, route) if stream else reply_text(reply, route)
        assert text == alone(route, index, 12), (route, index, stream)
        if not stream:
            assert reply["usage"]["prompt_tokens"] > 0 and reply["usage"]["completion_tokens"] <= 12
            assert reply["object"] == ("chat.completion" if "chat" in route else "text_completion")
    assert len(results) == len(jobs)
    assert max(sampled) >= 2, "the requests were not decoded together"
    wait_idle(server)


def test_requests_the_engine_does_not_take_are_served_by_the_llama(server, alone):
    status, reply, _ = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "echo": True})
    assert status == 200 and reply["choices"][0]["text"].startswith("Hi")
    # the Llama penalizes generated tokens only (the engine the prompt's too): penalties take the serial path
    status, reply, _ = post(server, "/v1/completions", body_for("/v1/completions", 0, 12, False, repeat_penalty=1.3))
    assert status == 200 and reply_text(reply, "/v1/completions") == alone("/v1/completions", 0, 12,
                                                                           repeat_penalty=1.3)


def test_only_requests_whose_options_the_engine_serves_take_it():
    from types import SimpleNamespace

    from llmplace.server.batching import BatchedGeneration

    batched = BatchedGeneration.__new__(BatchedGeneration)  # serial_reason reads only the Llama's chat settings
    batched.llama = SimpleNamespace(chat_handler=None, chat_format="chat_template.default", reasoning_format="none")
    plain = {"max_tokens": 4, "temperature": 0.5, "top_k": 3, "stop": ["x"], "seed": 1, "logit_bias": {"1": -1}}
    assert batched.serial_reason("completions", plain) is None and batched.serial_reason("chat", plain) is None
    assert batched.serial_reason("completions", {"echo": False, "logprobs": None}) is None
    assert "echo" in batched.serial_reason("completions", {"echo": True})
    assert "tools" in batched.serial_reason("chat", {"tools": [{"type": "function"}]})
    assert "a_field_added_later" in batched.serial_reason("chat", {"a_field_added_later": 1})  # never dropped
    assert "penalties" in batched.serial_reason("chat", {"repeat_penalty": 1.1})
    assert "penalties" in batched.serial_reason("completions", {"presence_penalty": 0.5})


def test_health_and_metrics(server):
    state = health(server)
    assert state["status"] == "ok" and state["slots_total"] == 4 and state["slots_busy"] >= 0
    # --exact-batching auto on the CPU: exact, and batched (the CPU's batch rows equal lone ones, probed at start)
    assert state["exact_batching"] is True and state["batched"] is True
    status, text, headers = get(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) llmplace_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        assert re.fullmatch(r'llmplace_\w+(\{status="\w+"\})?', name), line
        samples[name] = float(value)
    assert samples["llmplace_slots_total"] == 4 and samples["llmplace_queue_depth"] >= 0
    assert samples["llmplace_generated_tokens_total"] > 0 and samples["llmplace_prompt_tokens_total"] > 0
    assert samples['llmplace_requests_total{status="200"}'] >= 1
    assert samples["llmplace_generation_tokens_per_second"] >= 0


def _leave_after_first_event(port: int, route: str, body: dict) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    while not response.readline().startswith(b"data: "):
        pass
    response.close()  # the last reference to the socket (http.client let go of it: the stream ends the connection)
    connection.close()


def _leave_before_the_answer(port: int, route: str, body: dict, after: float = 0.3) -> None:
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(after)


def test_a_client_that_leaves_frees_its_slot(server, alone):
    started = time.monotonic()  # 900 tokens take ~30 s at this speed, if not cancelled
    _leave_after_first_event(server, "/v1/completions",
                             body_for("/v1/completions", 0, 900, True, logit_bias=SMOLLM2_EOS))
    _leave_before_the_answer(server, "/v1/chat/completions",
                             body_for("/v1/chat/completions", 0, 900, False, logit_bias=SMOLLM2_EOS))
    wait_idle(server, seconds=10)
    assert time.monotonic() - started < 10
    status, reply, _ = post(server, "/v1/completions", body_for("/v1/completions", 1, 6, False))
    assert status == 200 and reply_text(reply, "/v1/completions") == alone("/v1/completions", 1, 6)


def test_a_full_queue_answers_429_with_retry_after(smollm2_path):
    process, port = start(smollm2_path, "--slots", "2", "--max-queue", "1", "--exact-batching", "off")
    try:
        assert health(port)["exact_batching"] is False
        body = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "logit_bias": SMOLLM2_EOS}
        holders = [threading.Thread(target=_leave_before_the_answer, args=(port, "/v1/completions", body, 4.0))
                   for _ in range(3)]  # two run, one waits; all leave after 4 s
        for t in holders:
            t.start()
        deadline = time.monotonic() + 3
        while (state := health(port))["queue_depth"] < 1 or state["slots_busy"] < 2:  # two run, one waits
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        status, reply, headers = post(port, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert reply["error"]["code"] == "queue_full" and "--max-queue" in reply["error"]["message"]
        for t in holders:
            t.join()
        wait_idle(port)
        assert post(port, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
        metrics = get(port, "/metrics")[1].decode()
        assert 'llmplace_requests_total{status="429"} 1' in metrics
    finally:
        finish(process)


def test_load_32_clients_with_disconnects_and_slow_readers(server, alone):
    """32 clients, 160 requests of 6 or 12 tokens (completions and chats, streamed or not): 2 slow readers,
    ~15% of the others leave early (after the first event, or before the answer). Every well-behaved reply
    equals the lone one; no error; no slot leaked; server RSS grows less than RSS_BOUND_MIB."""
    rng = random.Random(20)
    plan = []
    for client in range(32):
        for _ in range(5):
            route = rng.choice(["/v1/completions", "/v1/completions", "/v1/chat/completions"])
            index = rng.randrange(len(PROMPTS) if route == "/v1/completions" else len(CHATS))
            behaviour = "slow" if client < 2 else rng.choices(["ok", "leave"], weights=[85, 15])[0]
            plan.append((client, route, index, rng.choice([6, 12]), rng.random() < 0.6, behaviour,
                         rng.random() < 0.3))
    process = psutil.Process(next(p.pid for p in psutil.Process().children() if _serves(p, server)))
    post(server, "/v1/completions", body_for("/v1/completions", 0, 6, True))  # warm: first-use allocations
    rss_before = process.memory_info().rss
    errors, checked, left = [], [0], [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        for _, route, index, max_tokens, stream, behaviour, banned in [p for p in plan if p[0] == number]:
            options = {"logit_bias": SMOLLM2_EOS} if banned else {}
            body = body_for(route, index, max_tokens, stream, **options)
            try:
                if behaviour == "leave":
                    if stream:
                        _leave_after_first_event(server, route, body)
                    else:
                        _leave_before_the_answer(server, route, body, after=0.05)
                    with lock:
                        left[0] += 1
                    continue
                status, reply, _ = post(server, route, body, slow=0.1 if behaviour == "slow" else 0.0)
                assert status == 200, reply
                text = streamed_text(reply, route) if stream else reply_text(reply, route)
                assert text == alone(route, index, max_tokens, **options), (route, index, max_tokens, stream)
                with lock:
                    checked[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                with lock:
                    errors.append(f"{route} {index} {stream} {behaviour}: {type(exc).__name__}: {exc}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    seconds = time.monotonic() - started
    state = wait_idle(server)
    growth = (process.memory_info().rss - rss_before) / 2**20
    print(f"{len(plan)} requests ({left[0]} left early) in {seconds:.1f} s; server RSS growth {growth:.1f} MiB")
    assert errors == []
    assert checked[0] + left[0] == len(plan) and state["slots_busy"] == 0
    assert growth < RSS_BOUND_MIB


def _serves(process: psutil.Process, port: int) -> bool:
    try:
        return "--port" in process.cmdline() and str(port) in process.cmdline()
    except psutil.Error:
        return False
