"""RPC servers that misbehave (issue 17, class 4): something that accepts the connection and then sends
garbage, closes, never answers, or speaks another protocol version must be refused with DeviceNotFoundError
before llama.cpp connects (it aborts the process on a bad reply and waits forever for a silent server).

The fake servers run in the case's own interpreter (threads), so each case is self-contained.

What cannot be refused beforehand, a connection lost after a good handshake, aborts the process inside
llama.cpp: the last test proves the README's recipe (the RPC-backed model in a child process) with a real
server killed mid-generation."""

from __future__ import annotations

import struct

from adversarial import outcomes, summary

SETUP = """
import socket, struct, threading, time
from llmplace.backends import add_rpc_server

_held = []  # connections a silent server keeps open

def serve(behaviour):
    '''A local server whose every connection is handed to behaviour(connection); returns its endpoint.'''
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    def loop():
        while True:
            connection, _ = listener.accept()
            behaviour(connection)
    threading.Thread(target=loop, daemon=True).start()
    return "127.0.0.1:%d" % listener.getsockname()[1]

def read_request(connection):
    command = connection.recv(1)
    size = struct.unpack("<Q", connection.recv(8))[0]
    if size:
        connection.recv(size)
    return command

def reply(connection, payload):
    connection.sendall(struct.pack("<Q", len(payload)) + payload)

def hello_then(rest, major=7, minor=0):
    '''A server that answers HELLO correctly (or with the given version), then behaves as rest(connection).'''
    def behaviour(connection):
        read_request(connection)
        reply(connection, bytes([major, minor, 0, 0]) + bytes(24))
        rest(connection)
    return behaviour

def device_count_then(count, rest):
    def after_hello(connection):
        read_request(connection)
        reply(connection, struct.pack("<I", count))
        rest(connection)
    return hello_then(after_hello)

def load_with(endpoint):
    return llmplace.load(MODEL, rpc_servers=[endpoint], progress=False)
"""

BEHAVIOURS = {
    "garbage": "lambda c: (c.sendall(b'HTTP/1.1 400 Bad Request\\r\\n\\r\\n' * 4), c.close())",
    "binary_garbage": "lambda c: (c.sendall(bytes(range(256)) * 8), c.close())",
    "closes_at_once": "lambda c: c.close()",
    "never_answers": "_held.append",
    "reads_then_closes": "lambda c: (c.recv(64), c.close())",
    "short_hello": "lambda c: (read_request(c), reply(c, b'\\x07\\x00'), c.close())",
    "hello_size_right_bytes_missing": "lambda c: (read_request(c), c.sendall(struct.pack('<Q', 28) + b'\\x07'),"
                                      " _held.append(c))",
    "older_major_version": "hello_then(_held.append, major=6)",
    "newer_minor_version": "hello_then(_held.append, minor=9)",
    "hello_then_closes": "hello_then(lambda c: c.close())",
    "hello_then_silent": "hello_then(_held.append)",
    "zero_devices": "device_count_then(0, _held.append)",
    "absurd_device_count": "device_count_then(0xFFFFFFFF, _held.append)",
    "device_count_then_closes": "device_count_then(1, lambda c: c.close())",
    "device_memory_garbage": "device_count_then(1, lambda c: (read_request(c), reply(c, b'xyz')))",
}

BAD_ENDPOINTS = ["'127.0.0.1:99999'", "'127.0.0.1:0'", "'::1:50052'", "'127.0.0.1'", "':50052'",
                 "'127.0.0.1:50\\x0052'", "'127.0.0.1:５００５２'", "12345", "'bad host name with spaces:1'",
                 "'127.0.0.1:-1'"]


def test_misbehaving_rpc_servers_are_refused_before_llama_cpp_connects(tiny_llama_path):
    cases = {f"load_{name}": f"load_with(serve({behaviour}))" for name, behaviour in BEHAVIOURS.items()}
    # add_rpc_server directly too: the same check guards both ways in.
    cases.update({f"add_{name}": f"add_rpc_server(serve({behaviour}), timeout=1.0)"
                  for name, behaviour in list(BEHAVIOURS.items())[:4]})
    results = outcomes(f"MODEL = {str(tiny_llama_path)!r}\n" + SETUP, cases, timeout=180)
    print(summary(results))
    assert {name: r.kind for name, r in results.items()} == dict.fromkeys(cases, "typed"), summary(results)
    assert all(r.error == "DeviceNotFoundError" for r in results.values()), summary(results)
    # the messages say what the server did wrong
    assert "did not answer" in results["load_never_answers"].message
    assert "protocol 6.0" in results["load_older_major_version"].message
    assert "0 devices" in results["load_zero_devices"].message


def test_malformed_rpc_endpoints_are_refused(tiny_llama_path):
    cases = {f"endpoint_{i}": f"load_with({endpoint})" for i, endpoint in enumerate(BAD_ENDPOINTS)}
    cases["endpoint_as_one_string_list"] = "llmplace.load(MODEL, rpc_servers='127.0.0.1:1,127.0.0.1:2', progress=False)"
    results = outcomes(f"MODEL = {str(tiny_llama_path)!r}\n" + SETUP, cases, timeout=120)
    print(summary(results))
    assert {name: r.kind for name, r in results.items()} == dict.fromkeys(cases, "typed"), summary(results)


def test_a_real_rpc_server_passes_the_handshake(rpc_devices):
    # the conftest fixture registered two real llmplace-rpc-server processes through the same check
    assert len(rpc_devices) == 2 and all(d.kind == "rpc" for d in rpc_devices)


def test_the_protocol_version_matches_the_pinned_header():
    from pathlib import Path

    import pytest

    from llmplace import rpc

    header = Path(__file__).parent.parent / "vendor/llama.cpp/ggml/include/ggml-rpc.h"
    if not header.exists():
        pytest.skip("the pinned llama.cpp source is not in vendor/")
    text = header.read_text()
    assert f"RPC_PROTO_MAJOR_VERSION    {rpc.PROTOCOL_MAJOR}" in text
    assert f"RPC_PROTO_MINOR_VERSION    {rpc.PROTOCOL_MINOR}" in text
    assert struct.calcsize("<BBBB") + rpc.CONN_CAPS_BYTES == 28



# The README's recipe for the one failure that cannot be caught: llama.cpp's RPC client aborts the process when
# a reply fails after a good handshake (RPC_STATUS_ASSERT calls GGML_ABORT: no error path to return through).
# So the model that uses the RPC server runs in a process of its own; when the connection drops, that process
# ends and its parent carries on.
CHILD_GENERATING_OVER_RPC = """
import sys
import llmplace

model = llmplace.load(sys.argv[1], rpc_servers=[sys.argv[2]], progress=False)
on_rpc = sum("RPC" in row.buffer_type for row in model.placement_report())
print("LOADED", on_rpc, flush=True)
while True:  # generate for ever: every token is a round trip to the RPC server
    for step in llmplace.stream_generate(model, "Once upon a time", max_tokens=64, temperature=0):
        print("TOKEN", step.token, flush=True)
"""


def test_an_rpc_connection_lost_mid_generation_ends_only_the_child_process_that_held_it(tiny_llama_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    from isolation import OUTSIDE_CHECKOUT
    from processes import free_port, stop

    from llmplace._ffi import BIN_DIR, LIB_DIR

    port = free_port()
    server = subprocess.Popen([str(BIN_DIR / "llmplace-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                              cwd=LIB_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = watchdog = None
    try:
        deadline = time.monotonic() + 30
        while True:  # the server listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the RPC server did not start"
                time.sleep(0.1)
        child = subprocess.Popen([sys.executable, "-c", CHILD_GENERATING_OVER_RPC, str(tiny_llama_path),
                                  f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=OUTSIDE_CHECKOUT, env=dict(os.environ, GGML_NO_BACKTRACE="1"))
        watchdog = threading.Timer(120, child.kill)  # bounded: a child stuck before its first lines is killed
        watchdog.start()
        lines = []
        for line in child.stdout:
            lines.append(line.split())
            if sum(words[0] == "TOKEN" for words in lines) >= 5:
                break
        assert lines and lines[0][0] == "LOADED" and int(lines[0][1]) > 0, \
            f"the child did not load its weights onto the RPC server: {lines} {child.stderr.read()[-2000:]}"
        assert sum(words[0] == "TOKEN" for words in lines) >= 5, "the child was not generating over RPC"

        server.kill()  # the connection drops in the middle of the generation
        server.wait()
        started = time.monotonic()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the child hung after its RPC server died (it should have ended)") from None
        stderr = child.stderr.read()
        print(f"child ended with {child.returncode} {time.monotonic() - started:.2f} s after the server died; "
              f"stderr tail: {stderr[-300:]!r}")
        # llama.cpp aborted the child (SIGABRT): it could not have raised; this process is unaffected.
        assert child.returncode == -signal.SIGABRT, stderr[-2000:]
        assert "Remote RPC server crashed or returned malformed response" in stderr, stderr[-2000:]
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if server.poll() is None:
            stop(server)
