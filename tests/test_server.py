"""The OpenAI-compatible server: the official `openai` client against real `llmplace serve` processes on 127.0.0.1
(SmolLM2): models, completion, chat, streaming, embeddings, 32 concurrent streaming clients, a client that
disconnects mid-stream, the API key, OpenAI-shaped errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

import llmplace  # noqa: E402  (after the importorskip above)
from processes import free_port, stop, wait_until_serving  # noqa: E402  (tests/processes.py)

KEY = "test-key"


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.loads(response.read())


_PROCESSES: dict[int, subprocess.Popen] = {}   # port → server process (for its memory use)


def _start(path, *extra):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "serve", str(path), "--port", str(port),
                                "--api-key", KEY, "--threads", "1", "--n-ctx", "1024", *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd=tempfile.gettempdir())  # outside the checkout: its llmplace/ has no compiled module
    wait_until_serving(process, port)
    return process, port


@pytest.fixture(scope="module")
def server(smollm2_path):
    process, port = _start(smollm2_path)
    _PROCESSES[port] = process
    yield port
    stop(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(smollm2_path):
    with llmplace.Llama(str(smollm2_path), verbose=False, n_threads=1, n_ctx=1024) as llm:
        yield llm


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_completion_matches_the_library(client, local):
    reply = client.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
    expected = local("The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected["choices"][0]["text"]
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert reply.object == "text_completion"


def test_chat_matches_the_library(client, local):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=24, temperature=0)
    expected = local.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == expected["choices"][0]["finish_reason"]


def test_streamed_chat_gives_the_same_text(client, local):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    local_reply = local.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert text == local_reply["choices"][0]["message"]["content"]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_completion(client):
    chunks = list(client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and "".join(c.choices[0].text for c in chunks)


def test_thirty_two_concurrent_streaming_clients_all_succeed_in_bounded_memory(client, server):
    import psutil

    process = psutil.Process(_PROCESSES[server].pid)
    results, errors = {}, []

    def one(i):
        try:
            stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Count to {i}"}],
                                                    max_tokens=6, temperature=0, stream=True)
            results[i] = [c.choices[0].finish_reason for c in stream][-1]
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    rss_before = process.memory_info().rss
    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    growth = (process.memory_info().rss - rss_before) / 2**20
    print(f"server RSS growth over 32 concurrent streams: {growth:.1f} MiB")
    assert errors == [] and len(results) == 32 and set(results.values()) <= {"stop", "length"}
    assert growth < 64


def test_a_client_that_disconnects_stops_its_generation(client, server):
    stream = client.completions.create(model="x", prompt="Once upon a time", max_tokens=900, temperature=0,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10  # 900 tokens would take far longer than this
    while _health(server)["busy"]:
        assert time.monotonic() < deadline, "the server kept generating for a client that left"
        time.sleep(0.05)
    # and the next request is served normally
    assert client.completions.create(model="x", prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_wrong_api_key_is_refused(server):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_errors_are_openai_shaped(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="x", prompt="hello " * 1200, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and "exceed context window" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.post("/nothing-here", cast_to=object, body={})


def test_embeddings(smollm2_path):
    process, port = _start(smollm2_path, "--embedding")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        result = client.embeddings.create(model="x", input=["hello world", "hi"], encoding_format="float")
        with llmplace.Llama(str(smollm2_path), verbose=False, embedding=True, n_ctx=1024) as local:
            expected = local.create_embedding(["hello world", "hi"])
        assert len(result.data) == 2 and result.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        np.testing.assert_allclose(result.data[0].embedding, expected["data"][0]["embedding"], atol=1e-3)
    finally:
        stop(process)
