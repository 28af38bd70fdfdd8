"""The server under hostile clients (issue 17, class 6), against one real `llmplace serve` process (SmolLM2) spoken
to with raw sockets: malformed bodies and headers get 4xx (never 500, never a held thread), every field's type is
checked, max_tokens is bounded, the API key check survives odd bytes, a client that stops reading or leaves does
not hold the model for the others.

The server runs in its own process, so a crash shows as a failed request and a dead process (asserted at the
end), not as a dead pytest."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import llmplace
from processes import free_port, stop

KEY = "adversarial-key"
LIMIT = 128  # --max-tokens-limit: the most tokens one request may generate
SMOLLM2_EOS = {"0": -100, "2": -100}  # logit_bias that bans SmolLM2's end tokens: a reply runs to its limit
MODEL_NAME = "m" * 40000  # every streamed chunk repeats it: ~40 KB per token, so a non-reader's buffers fill fast


@pytest.fixture(scope="module")
def server(smollm2_path):
    port = free_port()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmplace.cli", "serve", str(smollm2_path), "--port", str(port), "--api-key", KEY,
         "--threads", "1", "--n-ctx", "1024", "--max-tokens-limit", str(LIMIT), "--read-timeout", "2",
         "--write-timeout", "2", "--max-body-bytes", str(1 << 20), "--model-name", MODEL_NAME],
        stdout=subprocess.DEVNULL, stderr=log, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 60
    while request(port, "GET", "/health", None)[0] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            raise AssertionError(f"the server did not start: {log.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.2)
    yield port
    alive = process.poll() is None
    stop(process)
    log.seek(0)
    assert alive, f"the server died: {log.read().decode(errors='replace')[-3000:]}"


def raw(port: int, data: bytes, *, timeout: float = 60, keep_open_after: float = 0.0) -> tuple[int | None, bytes]:
    """Send bytes, read until the server closes; (status, body). status None: closed without an answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            response = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                response += chunk
    except ConnectionResetError:
        return None, b""
    if not response:
        return None, b""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def http(method: str, path: str, body: bytes | None, headers: dict | None = None) -> bytes:
    headers = {"Host": "x", "Connection": "close", "Authorization": f"Bearer {KEY}", **(headers or {})}
    if body is not None and "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def request(port, method, path, payload, headers=None) -> tuple[int | None, dict | bytes]:
    body = None if payload is None else payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    try:
        status, data = raw(port, http(method, path, body, headers))
    except OSError:
        return None, b""
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


# ---- malformed bodies and headers: 4xx, the right one ----
DEEP = 100_000
BODIES = {
    "array_nested_100k": (b"[" * DEEP + b"]" * DEEP, 400),
    "prompt_nested_100k": (b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400),
    "object_nested_100k": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, 400),
    "nested_65_levels": (b'{"stop": ' + b"[" * 64 + b'"x"' + b"]" * 64 + b"}", 400),
    "a_list_body": (b"[]", 400),
    "a_string_body": (b'"hello"', 400),
    "not_json": (b"{prompt: hi", 400),
    "invalid_utf8": (b'{"prompt": "\xff\xfe"}', 400),
    "infinity_literal": (b'{"prompt": "hi", "max_tokens": Infinity}', 400),
    "nan_literal": (b'{"prompt": "hi", "temperature": NaN}', 400),
    "overflowing_float": (b'{"prompt": "hi", "temperature": 1e400}', 400),
}
HEADERS = {
    "content_length_1e14": ({"Content-Length": "100000000000000"}, b"{}", 413),
    "content_length_above_cap": ({"Content-Length": str((1 << 20) + 1)}, b"{}", 413),
    "content_length_negative": ({"Content-Length": "-1"}, b"{}", 400),
    "content_length_garbage": ({"Content-Length": "abc"}, b"{}", 400),
    "content_length_float": ({"Content-Length": "1e3"}, b"{}", 400),
    "content_length_missing": ({}, None, 400),
    "chunked_body": ({"Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n", 400),
}


def test_malformed_bodies_and_headers_get_4xx(server):
    seen = {}
    for name, (body, _) in BODIES.items():
        seen[name] = request(server, "POST", "/v1/completions", body)[0]
    for name, (headers, body, _) in HEADERS.items():
        seen[name] = raw(server, http("POST", "/v1/completions", body, headers))[0]
    expected = {name: case[-1] for name, case in {**BODIES, **HEADERS}.items()}
    assert seen == expected


def test_conflicting_content_lengths_are_refused_not_read_as_two_requests(server):
    # the first length won and the rest of the body was parsed as a second request: a request smuggled past a
    # proxy that read the other length (RFC 9112 6.3: unrecoverable, 400)
    body = b'{"prompt": "hi", "max_tokens": 1}'
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + len(smuggled)}\r\n\r\n").encode()
    status, data = raw(server, head + body + smuggled)
    assert status == 400 and b"Content-Length headers that disagree" in data
    assert data.count(b"HTTP/1.1") == 0  # one answer, nothing after it


def test_limits_no_request_could_live_with_are_refused_before_the_model_loads():
    from llmplace.server.app import check_limits

    for bad in (dict(max_tokens_limit=-5), dict(max_tokens_limit=0), dict(read_timeout=0),
                dict(read_timeout=-1), dict(write_timeout=float("nan")), dict(max_body_bytes=-1)):
        with pytest.raises(llmplace.InvalidParameterError, match=next(iter(bad))):
            check_limits(**bad)
    check_limits(max_tokens_limit=None, read_timeout=0.5, write_timeout=30, max_body_bytes=1)


# ---- every field's type: a 400 naming the field ----
BAD_FIELDS = {
    "/v1/completions": {
        "max_tokens": [1e9, -1, 0, "10", True, [], 2**70], "temperature": ["hot", [], {}, True, 1e31],
        "top_p": ["x", None and 0], "top_k": [1.5, -1, "5"], "min_p": [[0.1]], "typical_p": [{}],
        "presence_penalty": ["a"], "frequency_penalty": [False], "repeat_penalty": [[1]],
        "seed": ["x", 1.5, 2**70], "stop": [5, [1, 2], {"a": 1}, ["x"] * 65],
        "logit_bias": [[], [[1, 2]], {"x": 1}, {"5": "a"}, {"-1": 1}, {"5": 1e40}],
        "suffix": [5], "echo": ["yes", 1], "logprobs": [100, "x", -1], "prompt": [5, {"a": 1}, [1.5], ["a", "b"],
                                                                                  [[1], [2]], [-3]],
        "stream": ["yes"], "n": [2, "x"], "model": [5], "user": [[]], "max_completion_tokens": [-5],
    },
    "/v1/chat/completions": {
        "messages": ["hi", [], ["hi"], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}],
                     {"role": "user"}],
        "response_format": ["json", []], "tools": [{}, ["x"]], "tool_choice": [5], "functions": ["x"],
        "function_call": [5], "logprobs": [5], "top_logprobs": [-1, "x", 21], "max_tokens": [-1, 1.5],
        "logit_bias": [[[2, -100]]], "stream": [1],
    },
    "/v1/embeddings": {"input": [5, [], [1, 2], {"a": 1}]},
    "/extras/tokenize": {"input": [5, ["a"]]},
    "/extras/detokenize": {"tokens": ["x", [1.5], [-1], [10**12], [True]]},
}
VALID = {"/v1/completions": {"prompt": "hi", "max_tokens": 1}, "/v1/chat/completions":
         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, "/v1/embeddings": {"input": "hi"},
         "/extras/tokenize": {"input": "hi"}, "/extras/detokenize": {"tokens": [1]}}


def test_every_field_of_the_wrong_type_is_a_400_naming_it(server):
    wrong = []
    cases = 0
    for route, fields in BAD_FIELDS.items():
        for field, values in fields.items():
            for value in values:
                if value is None or value == 0 and field == "top_p":
                    continue
                cases += 1
                status, body = request(server, "POST", route, {**VALID[route], field: value})
                if status != 400 or not isinstance(body, dict) or body["error"]["param"] not in (field, None):
                    wrong.append((route, field, value, status, body))
    print(f"{cases} wrong-type cases")
    assert wrong == []
    # and the valid requests themselves are served
    assert request(server, "POST", "/extras/detokenize", VALID["/extras/detokenize"])[0] == 200
    assert request(server, "POST", "/v1/completions", VALID["/v1/completions"])[0] == 200


def test_odd_authorization_headers_are_refused_not_crashed(server):
    for value in ("Bearer \xe9\xff\x00", "Bearer " + "x" * 8000, None, "bearer " + KEY, "Bearer " + KEY + "x"):
        assert request(server, "GET", "/v1/models", None, {"Authorization": value})[0] == 401, value
    assert request(server, "GET", "/v1/models", None)[0] == 200


# ---- clients that send too little: only their own thread waits, and not for long ----
def test_a_body_shorter_than_announced_times_out_without_blocking_others(server):
    started = time.monotonic()
    results = {}

    def short_body():
        results["short"] = raw(server, http("POST", "/v1/completions", b'{"prompt"', {"Content-Length": "100"}))[0]

    def headers_never_end():
        results["headers"] = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")[0]

    threads = [threading.Thread(target=f) for f in (short_body, headers_never_end)]
    for t in threads:
        t.start()
    status, reply = request(server, "POST", "/extras/tokenize", {"input": "hello"})  # served meanwhile
    assert status == 200 and reply["tokens"]
    for t in threads:
        t.join(timeout=30)
    assert results == {"short": 408, "headers": None}  # 408; a request line without end: closed
    assert time.monotonic() - started < 20


# ---- work is bounded; a client that stops reading or leaves frees the model ----
@pytest.fixture(scope="module")
def full_generation(server):
    """A max_tokens far beyond the limit is bounded to it; returns the seconds one full-length generation takes
    (what the other tests compare against)."""
    started = time.monotonic()
    status, reply = request(server, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 10**9,
                                                                 "temperature": 0, "logit_bias": SMOLLM2_EOS})
    seconds = time.monotonic() - started
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == LIMIT and reply["choices"][0]["finish_reason"] == "length"
    return seconds


def test_max_tokens_is_bounded_by_the_server_limit(full_generation):
    assert full_generation > 0


def _quick(server) -> float:
    started = time.monotonic()
    status, reply = request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 0})
    assert status == 200, reply
    return time.monotonic() - started


def test_departed_clients_stop_their_generation_and_are_skipped(server, full_generation):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": LIMIT, "temperature": 0,
                       "logit_bias": SMOLLM2_EOS}).encode()
    running = socket.create_connection(("127.0.0.1", server))
    running.sendall(http("POST", "/v1/completions", body))
    time.sleep(0.3)  # it holds the model now
    queued = []
    for _ in range(6):  # these queue behind it
        s = socket.create_connection(("127.0.0.1", server))
        s.sendall(http("POST", "/v1/completions", body))
        queued.append(s)
    time.sleep(0.2)
    for s in [running, *queued]:
        s.close()  # all leave before any answer
    waited = _quick(server)
    # Without the watch the seven requests would run to their end first: 7 full generations.
    print(f"full generation {full_generation:.2f} s, the next request after 7 departures waited {waited:.2f} s")
    assert waited < full_generation


def test_a_streaming_client_that_stops_reading_is_dropped(server, full_generation):
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its window fills at once
    slow.connect(("127.0.0.1", server))
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": LIMIT,
                       "temperature": 0, "stream": True, "logit_bias": SMOLLM2_EOS}).encode()
    slow.sendall(http("POST", "/v1/chat/completions", body))
    time.sleep(0.5)
    waited = _quick(server)
    slow.setblocking(False)
    received = b""
    try:
        while chunk := slow.recv(1 << 20):
            received += chunk
    except BlockingIOError:
        pass
    slow.close()
    print(f"a 1-token request behind a client that stopped reading waited {waited:.2f} s "
          f"(one full generation: {full_generation:.2f} s); the slow client got {len(received)} bytes")
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received  # it was dropped
    assert waited < 3 * full_generation + 10  # its write timeout is 2 s; before the fix: forever


def test_the_server_answers_correctly_after_all_of_this(server):
    first = request(server, "POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6,
                                                        "temperature": 0})
    again = request(server, "POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6,
                                                        "temperature": 0})
    assert first[0] == again[0] == 200
    assert first[1]["choices"][0]["text"] == again[1]["choices"][0]["text"]
    assert request(server, "GET", "/health", None)[1]["busy"] is False
