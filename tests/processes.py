"""Helpers for tests that start processes of their own (servers, RPC servers): a free port, a clean stop."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Terminate `process`, killing it if it has not ended 10 s later."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_serving(process: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    """Wait until the server `process` answers /health on 127.0.0.1:port; RuntimeError with its stderr if it
    exits first, the last connection error (after killing it) if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stderr.read().decode(errors='replace')}") from None
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.2)
