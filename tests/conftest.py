from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402  (tests/models.py)
from processes import free_port  # noqa: E402  (tests/processes.py)

import llmplace  # noqa: E402


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    with llmplace.load(smollm2_path, progress=False) as model:
        yield model


@pytest.fixture(scope="session")
def pinned_templates(model_cache) -> dict[str, Path]:
    """{name: path} of the chat templates in the pinned llama.cpp source's models/templates/."""
    return models.llama_cpp_templates(model_cache)


@pytest.fixture(scope="session")
def gemma3_path(model_cache) -> Path:
    return models.gemma3_path(model_cache)


@pytest.fixture(scope="session")
def tiny_llama_path(model_cache) -> Path:
    return models.synthetic_path(model_cache, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen3moe_path(model_cache) -> Path:
    return models.synthetic_path(model_cache, "tiny-qwen3moe")


@pytest.fixture(scope="session")
def rpc_devices():
    """Two local RPC servers (CPU backend) registered as devices RPC0 and RPC1: multi-device placement on a
    machine without a GPU (DESIGN §7). Registered devices stay for the rest of the process, so tests using
    this fixture run last (pytest_collection_modifyitems below); the servers stop at the end of the session."""
    import socket
    import subprocess
    import time

    from llmplace._ffi import BIN_DIR, LIB_DIR
    from llmplace.backends import add_rpc_server

    servers, endpoints = [], []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(subprocess.Popen([str(BIN_DIR / "llmplace-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                             "-t", "1"], cwd=LIB_DIR, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
        for endpoint in endpoints:
            deadline = time.monotonic() + 30
            while True:
                try:
                    host, port = endpoint.split(":")
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        devices = [d for endpoint in endpoints for d in add_rpc_server(endpoint)]
        yield devices
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=10)


def pytest_collection_modifyitems(items):
    # RPC devices, once registered, take part in every later load (as GPUs would): run those tests last.
    items.sort(key=lambda item: "rpc_devices" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def small_qwen3moe_path(model_cache) -> Path:
    return models.synthetic_path(model_cache, "small-qwen3moe")
