"""Speak the first words of ggml's RPC protocol from Python, before llama.cpp connects to a server.

llama.cpp treats any RPC failure as fatal: a server that accepts the connection and then sends garbage, closes
it, or announces another protocol version aborts the whole process ("Remote RPC server crashed or returned
malformed response"), and one that never answers blocks the load forever (its sockets have no timeout). So
`probe` first has the conversation llama.cpp's `ggml_backend_rpc_add_server` will have (HELLO, then the device
count, then each device's memory, as the device list asks next), over a socket of its own with a timeout, and
refuses anything that is not a compatible server with DeviceNotFoundError.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp at the pinned commit): a request is | command (1 byte) | payload
size (uint64 LE) | payload |, a reply is | payload size (uint64 LE) | payload |. A server serves one client at a
time, so the probe's connection is closed before llama.cpp opens its own.
"""

from __future__ import annotations

import socket
import struct
import time

from .errors import DeviceNotFoundError

# ggml-rpc.h's RPC_PROTO_MAJOR_VERSION / RPC_PROTO_MINOR_VERSION at the pinned commit: llama.cpp refuses a
# server of another major version, or of a newer minor one (and aborts when it does).
PROTOCOL_MAJOR = 7
PROTOCOL_MINOR = 0
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_BYTES = 24  # transport.h RPC_CONN_CAPS_SIZE; all zero = plain TCP, no transport upgrade
# More devices than one machine plausibly has: a count beyond it is garbage that happened to be 4 bytes long.
MAX_DEVICES = 256

_HELLO_REPLY = struct.Struct("<BBBB")  # major, minor, patch, padding (then the server's conn caps)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
START_HINT = "start one there with `llmplace rpc-server` / llmplace-rpc-server -H HOST -p PORT"


class _NotRpc(Exception):
    """Internal: what the peer did wrong; probe() turns it into DeviceNotFoundError."""


class _Connection:
    """A socket whose every read and write must finish before one deadline (a server dribbling a byte at a
    time cannot stretch the probe)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.deadline = sock, time.monotonic() + timeout

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)

    def send(self, data: bytes) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        self._arm()
        return self.sock.recv(n)


def _receive(sock: _Connection, n: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _NotRpc(f"the server closed the connection after {len(data)} of the {n} bytes of {what}")
        data += chunk
    return bytes(data)


def _call(sock: _Connection, command: int, payload: bytes, reply_size: int, what: str) -> bytes:
    sock.send(bytes([command]) + _U64.pack(len(payload)) + payload)
    (size,) = _U64.unpack(_receive(sock, 8, f"the size of the {what} reply"))
    if size != reply_size:
        raise _NotRpc(f"its {what} reply announces {size} bytes, where an RPC server sends {reply_size}")
    return _receive(sock, reply_size, f"the {what} reply")


def _converse(sock: _Connection) -> int:
    reply = _call(sock, CMD_HELLO, bytes(CONN_CAPS_BYTES), _HELLO_REPLY.size + CONN_CAPS_BYTES, "HELLO")
    major, minor, patch, _ = _HELLO_REPLY.unpack_from(reply)
    if major != PROTOCOL_MAJOR or minor > PROTOCOL_MINOR:
        raise _NotRpc(f"it speaks RPC protocol {major}.{minor}.{patch}, this llama.cpp speaks "
                      f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}.x: run the llmplace-rpc-server of this llmplace version")
    (count,) = _U32.unpack(_call(sock, CMD_DEVICE_COUNT, b"", _U32.size, "DEVICE_COUNT"))
    if not 1 <= count <= MAX_DEVICES:
        raise _NotRpc(f"it reports {count} devices (an RPC server has 1 to {MAX_DEVICES})")
    for device in range(count):
        _call(sock, CMD_GET_DEVICE_MEMORY, _U32.pack(device), 2 * _U64.size, "GET_DEVICE_MEMORY")
    return count


def parse_endpoint(endpoint) -> tuple[str, int]:
    """("host", port) of "host:port", refusing what llama.cpp's own parser would misread: it splits at the first
    colon, so a host may not hold one (no bare IPv6 addresses; use a name or an IPv4 address)."""
    if not isinstance(endpoint, str):
        raise DeviceNotFoundError(f"an RPC endpoint must be a 'host:port' string, not {type(endpoint).__name__}")
    host, _, port = endpoint.partition(":")
    if not host or ":" in port or "\0" in endpoint or not port.isascii() or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise DeviceNotFoundError(f"RPC endpoint {endpoint!r} must look like 'host:port' with a port from 1 to "
                                  "65535, e.g. '127.0.0.1:50052' (IPv6 addresses are not accepted: use a host name)")
    return host, int(port)


def probe(host: str, port: int, timeout: float = 3.0) -> int:
    """Connect to host:port, check that a compatible ggml RPC server answers, and return its device count.
    Raises DeviceNotFoundError for anything else, within about `timeout` seconds for the whole conversation."""
    endpoint = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError) as exc:  # ValueError: a host name IDNA cannot encode
        raise DeviceNotFoundError(f"cannot reach the RPC server at {endpoint} ({exc}); {START_HINT}") from None
    try:
        with sock:
            return _converse(_Connection(sock, timeout))
    except _NotRpc as exc:
        raise DeviceNotFoundError(f"{endpoint} is not a usable llama.cpp RPC server: {exc}. Check the address; "
                                  f"{START_HINT}") from None
    except TimeoutError:
        raise DeviceNotFoundError(f"the RPC server at {endpoint} accepted the connection but did not answer the "
                                  f"RPC handshake within {timeout} s: is it an RPC server, and not busy serving "
                                  f"another client? {START_HINT}") from None
    except OSError as exc:
        raise DeviceNotFoundError(f"the server at {endpoint} accepted the connection, then broke it during the "
                                  f"RPC handshake ({exc}): is it an RPC server? {START_HINT}") from None
