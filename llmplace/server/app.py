"""The OpenAI-compatible HTTP API over one llmplace.Llama, on the standard library's threading HTTP server.

With slots (make_server(slots=N), `llmplace serve --slots N`, N >= 2) completions and chats run on an
llmplace.Engine over the Llama's model, decoded together (batching.py); the rest, and everything with
slots=1, is served by the Llama one request at a time (a FIFO queue in front of it), queued requests waiting
instead of failing. Both queues are bounded (max_queue; beyond it 429 with Retry-After). Since a request holds
a slot, or everyone behind it, no client may hold the model longer than its own work:
- a client that disconnects, before its turn or during its generation, is noticed (its socket is watched while
  it is served) and its generation aborted (the engine's request cancelled: its slot frees at the next
  step); a streaming client that stops reading is dropped after `write_timeout` seconds of a blocked write;
- bodies are bounded (`max_body_bytes`, 413 above it; a missing, negative or garbage Content-Length is a 400)
  and read under `read_timeout`, so a client that announces more than it sends holds only its own thread;
- every field's type is checked (400, naming the field) and max_tokens is bounded by `max_tokens_limit`
  (default: the context size), so no request asks for unbounded work.
Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
import math
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..compat import Llama, UnsupportedFeatureError
from ..engine import Engine
from ..errors import AbortedError, BusyError, ClosedError, ContextOverflowError, InvalidParameterError, OutOfMemoryError
from .defaults import MAX_QUEUE
from .batching import BatchedGeneration
from .metrics import Metrics

MAX_BODY_BYTES = 16 << 20  # a prompt filling a 1M-token context is ~4 MB of text
MAX_JSON_DEPTH = 64        # tool schemas nest a dozen levels; deeper only costs recursion in the converters
READ_TIMEOUT = 30.0        # seconds a client may take to send its headers and body
WRITE_TIMEOUT = 10.0       # seconds one write may block on a client that does not read
RETRY_AFTER = 1            # seconds a client told "queue full" (429) should wait before retrying

# Request fields passed through to create_completion / create_chat_completion (OpenAI's, plus llama.cpp's).
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed",
             "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias")
_COMPLETION = _SAMPLING + ("suffix", "echo", "logprobs")
_CHAT = _SAMPLING + ("response_format", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                     "function_call", "parallel_tool_calls", "reasoning_format", "chat_template_kwargs",
                     "reasoning_budget_tokens")


class APIError(Exception):
    """An error to answer with an OpenAI-shaped body; close=True also ends the connection (the request's body
    was not read, so the rest of the stream cannot be parsed as a next request)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, close: bool = False, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.close = close
        self.headers = headers or {}


def queue_full(message: str) -> APIError:
    """429 with Retry-After: the request was not queued (the queue is bounded), it may be sent again later."""
    return APIError(429, message, "server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER)})


class ClientGone(Exception):
    """The client closed its connection: there is nobody to answer."""


# ---- request fields: every one has a type (and a range) checked before anything runs ----
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(low: int, high: int, what: str):
    def check(value):
        return None if _is_int(value) and low <= value <= high else f"an integer in [{low}, {high}] ({what})"
    return check


def _number(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e30 \
        and math.isfinite(value)
    return None if ok else "a finite number"


def _boolean(value):
    return None if isinstance(value, bool) else "true or false"


def _text(value):
    return None if isinstance(value, str) else "a string"


def _stop(value):
    ok = isinstance(value, str) or (isinstance(value, list) and len(value) <= 64
                                    and all(isinstance(v, str) for v in value))
    return None if ok else "a string or a list of at most 64 strings"


def _logit_bias(value):
    if not isinstance(value, dict):
        return "an object mapping token ids to numbers, e.g. {\"50256\": -100}"
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and int(key) < 2**31) or _number(bias):
            return f"an object mapping token ids to numbers (entry {key!r}: {bias!r} is not one)"
    return None


def _object(value):
    return None if isinstance(value, dict) else "an object"


def _objects(value):
    return None if isinstance(value, list) and all(isinstance(v, dict) for v in value) else "a list of objects"


def _text_or_object(value):
    return None if isinstance(value, (str, dict)) else "a string or an object"


def _prompt(value):
    token_list = lambda v: isinstance(v, list) and all(_is_int(t) and 0 <= t < 2**31 for t in v)  # noqa: E731
    if isinstance(value, str) or token_list(value):
        return None
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str) or token_list(value[0])):
        return None
    return "a string, a list of token ids, or a list holding one of these (send one request per prompt)"


def _messages(value):
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return "a non-empty list of {role, content} objects"
    for i, message in enumerate(value):
        if not isinstance(message.get("role"), str):
            return f"a list of {{role, content}} objects (message {i} has no string role)"
        if not isinstance(message.get("content"), (str, list, type(None))):
            return f"a list of {{role, content}} objects (message {i}'s content is not a string or a list of parts)"
    return None


def _embedding_input(value):
    ok = isinstance(value, str) and value or (isinstance(value, list) and value
                                              and all(isinstance(v, str) for v in value))
    return None if ok else "a string or a non-empty list of strings"


def _token_ids(value):
    ok = isinstance(value, list) and all(_is_int(t) and 0 <= t < 2**31 for t in value)
    return None if ok else "a list of token ids (integers)"


_COMMON_FIELDS = {"model": _text, "user": _text, "stream": _boolean, "stream_options": _object,
                  "n": _int_in(1, 1, "n > 1 is not supported: send n requests")}
_SAMPLING_FIELDS = {
    "max_tokens": _int_in(1, 2**31 - 1, "the most tokens to generate; leave it out for the default"),
    "max_completion_tokens": _int_in(1, 2**31 - 1, "the most tokens to generate; leave it out for the default"),
    "temperature": _number, "top_p": _number, "min_p": _number, "typical_p": _number,
    "presence_penalty": _number, "frequency_penalty": _number, "repeat_penalty": _number,
    "top_k": _int_in(0, 2**31 - 1, "0 = off"), "seed": _int_in(-2**63, 2**64 - 1, "any 64-bit integer"),
    "stop": _stop, "logit_bias": _logit_bias}
_FIELDS = {
    "completions": {**_COMMON_FIELDS, **_SAMPLING_FIELDS, "prompt": _prompt, "suffix": _text, "echo": _boolean,
                    "logprobs": _int_in(0, 20, "how many most likely tokens to report")},
    "chat": {**_COMMON_FIELDS, **_SAMPLING_FIELDS, "messages": _messages, "response_format": _object,
             "logprobs": _boolean, "top_logprobs": _int_in(0, 20, "how many most likely tokens to report"),
             "tools": _objects, "functions": _objects, "tool_choice": _text_or_object,
             "function_call": _text_or_object, "parallel_tool_calls": _boolean, "reasoning_format": _text,
             "chat_template_kwargs": _object,
             "reasoning_budget_tokens": _int_in(-1, 2**31 - 1, "tokens of thinking, -1 = no limit")},
    "embeddings": {**_COMMON_FIELDS, "input": _embedding_input, "encoding_format": _text},
    "tokenize": {"input": _text},
    "detokenize": {"tokens": _token_ids},
}


def _has_images(messages) -> bool:
    """Whether a chat request's messages hold an image_url content part."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"]) for m in messages)


def check_fields(body: dict, route: str) -> None:
    """Raise a 400 naming the first field whose value has the wrong type or range (null means "default", as
    OpenAI's API has it). Fields this server does not know are ignored, as OpenAI clients send extras."""
    for name, check in _FIELDS[route].items():
        if name in body and body[name] is not None:
            wanted = check(body[name])
            if wanted is not None:
                raise APIError(400, f"{name} must be {wanted}, not {json.dumps(body[name])[:80]}", param=name)


def _json_depth_at_most(value, limit: int) -> bool:
    """Whether `value` nests no deeper than `limit` levels of objects/lists (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its connection (readable with nothing to read, or reset); never blocks.
    poll, not select: select refuses descriptors above 1024, which a busy server reaches."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(connection, select.POLLIN)
            readable = bool(poller.poll(0))
        else:  # Windows
            readable = bool(select.select([connection], [], [], 0)[0])
        if not readable:
            return False
        # Readable: data (a pipelined request: still there) or the end of the stream (gone). Only asked when
        # readable, so a socket with a timeout does not wait here.
        return connection.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, TimeoutError):
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class ClientWatch:
    """While a request is served, poll its client's socket; when the client has left, call on_gone (and keep
    calling it until the request ends: the serial path's abort flag is reset by each decode; an engine
    request's cancel() is idempotent)."""

    POLL_SECONDS = 0.1

    def __init__(self, connection: socket.socket, on_gone) -> None:
        self.connection, self.on_gone = connection, on_gone
        self.gone = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmplace-client-watch", daemon=True)

    def __enter__(self) -> ClientWatch:
        if client_gone(self.connection):
            raise ClientGone()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()  # no abort may reach the next request's generation

    def _run(self) -> None:
        while not self._done.wait(self.POLL_SECONDS):
            if self.gone or client_gone(self.connection):
                self.gone = True
                self.on_gone()


class FifoLock:
    """A lock granted in arrival order, so that no queued request starves behind later ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc_info) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class ModelService:
    """The model behind the API, its public name, the optional API key, the serial request queue (entered
    with `with service:`), and the engine path when there is one (`batched`)."""

    def __init__(self, llama: Llama, model_name: str, api_key: str | None = None, *,
                 max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_tokens_limit: int | None = None,
                 max_queue: int = MAX_QUEUE, batched: BatchedGeneration | None = None,
                 metrics: Metrics | None = None) -> None:
        self.llama, self.model_name, self.api_key = llama, model_name, api_key
        self.max_body_bytes, self.read_timeout, self.write_timeout = max_body_bytes, read_timeout, write_timeout
        self.max_tokens_limit = max_tokens_limit or llama.n_ctx()
        self.max_queue = max_queue
        self.batched = batched
        self.metrics = metrics or Metrics()
        self.queue = FifoLock()
        self._count_lock = threading.Lock()
        self.waiting = 0  # requests queued for the Llama (bounded by max_queue)
        self.busy = 0     # requests holding the Llama (0 or 1)

    def __enter__(self) -> ModelService:
        with self._count_lock:
            if self.waiting >= self.max_queue:
                raise queue_full(f"the server's queue is full ({self.max_queue} requests wait for the model): "
                                 f"retry after {RETRY_AFTER} s, or start the server with a larger --max-queue")
            self.waiting += 1
        try:
            self.queue.__enter__()
        finally:
            with self._count_lock:
                self.waiting -= 1
        self.busy += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self.busy -= 1
        self.queue.__exit__(*exc_info)

    def abort_serial(self) -> None:
        """Abort the Llama's generation in flight (its client left)."""
        context = self.llama.llmplace_context
        if context is not None:
            context.abort()

    def occupancy(self) -> dict:
        """What /health and /metrics report: the engine's slots busy and total (without an engine, the Llama
        is the one slot), requests waiting (for a slot or for the Llama), and whether the Llama serves a request
        (with an engine, the requests it does not take run there, see batching.py)."""
        if self.batched is None:
            return {"slots_busy": self.busy, "slots_total": 1, "queue_depth": self.waiting,
                    "serial_busy": self.busy > 0}
        engine_busy, engine_waiting = self.batched.engine.occupancy()
        return {"slots_busy": engine_busy, "slots_total": self.batched.engine.slots,
                "queue_depth": engine_waiting + self.waiting, "serial_busy": self.busy > 0}


def _options(body: dict, names: tuple, max_tokens_limit: int) -> dict:
    options = {name: body[name] for name in names if name in body and body[name] is not None}
    if body.get("max_completion_tokens") is not None and "max_tokens" not in options:  # OpenAI's newer name
        options["max_tokens"] = body["max_completion_tokens"]
    if "max_tokens" in options:
        # Bounded: a request asking for more than the limit gets the limit (its reply ends with "length").
        options["max_tokens"] = min(options["max_tokens"], max_tokens_limit)
    return options


def _counted(chunks, metrics: Metrics):
    """The serial path's stream chunks, counting one generated token per chunk with text (the Llama streams one
    chunk per token whose text is complete; a token ending a stop string or a split character is not
    counted)."""
    try:
        for chunk in chunks:
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                metrics.count_generated()
            yield chunk
    finally:
        chunks.close()  # ends the Llama's generation now (the client left, or the stream ended)


class Handler(BaseHTTPRequestHandler):
    server_version = "llmplace"
    protocol_version = "HTTP/1.1"
    service: ModelService  # set on the subclass make_server creates

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the access log would go to stderr for every request

    # ---- plumbing ----
    def send_response(self, code: int, message: str | None = None) -> None:
        self.service.metrics.count_request(code)  # every answer passes here (the standard library's too)
        super().send_response(code, message)

    def _send_json(self, status: int, body: Any, headers: dict | None = None) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.connection.settimeout(self.service.write_timeout)  # a client that does not read is dropped
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        finally:
            self.connection.settimeout(self.service.read_timeout)

    def _read_body(self, route: str) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise APIError(400, "chunked request bodies are not supported: send a Content-Length", close=True)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise APIError(400, "the request has no Content-Length header: send the JSON body with its length",
                           close=True)
        if len({value.strip() for value in lengths}) > 1:
            # RFC 9112 6.3: a message with conflicting lengths is unrecoverable; reading one length would parse the
            # rest of the body as a next request (smuggled past a proxy that read the other length)
            raise APIError(400, f"the request has {len(lengths)} Content-Length headers that disagree: send one",
                           close=True)
        length = lengths[0].strip()
        if not (length.isascii() and length.isdigit()):
            raise APIError(400, f"Content-Length must be a non-negative integer, not {length[:40]!r}", close=True)
        if int(length) > self.service.max_body_bytes:
            raise APIError(413, f"the request body ({length} bytes) is larger than this server accepts "
                                f"({self.service.max_body_bytes} bytes)", code="request_too_large", close=True)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.service.read_timeout:g} s",
                           code="request_timeout", close=True) from None
        if len(raw) < int(length):
            raise ClientGone()  # the client closed before sending what it announced
        try:
            body = json.loads(raw or b"{}", parse_constant=_refuse_constant)
        except RecursionError:
            body = None  # nested too deep for the parser: refused below like any other over-deep body
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if body is None or not _json_depth_at_most(body, MAX_JSON_DEPTH):
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_fields(body, route)
        return body

    def _authorize(self) -> None:
        key = self.service.api_key
        if not key or self.path.split("?")[0].rstrip("/") == "/health":  # /metrics needs the key: it shows load
            return
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        sent = self.headers.get("Authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(sent, b"Bearer " + key.encode("utf-8")):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", code="invalid_api_key")

    def _handle(self, route) -> None:
        try:
            self._authorize()
            route()
        except APIError as exc:
            if exc.close:
                self.close_connection = True
            self._send_json(exc.status, exc.body, exc.headers)
        except (ClientGone, AbortedError, ConnectionError, TimeoutError):
            self.close_connection = True  # the client left (or stopped reading): nobody to answer
            self.service.metrics.count_request("disconnected")
        except BusyError as exc:  # the engine's wait queue is full
            error = queue_full(f"{exc} (server option: --max-queue)")
            self._send_json(error.status, error.body, error.headers)
        except ContextOverflowError as exc:
            self._send_json(400, APIError(400, str(exc), code="context_length_exceeded").body)
        except UnsupportedFeatureError as exc:
            self._send_json(400, APIError(400, str(exc), code="unsupported").body)
        except (ValueError, TypeError) as exc:
            self._send_json(400, APIError(400, str(exc)).body)
        except ClosedError as exc:
            self._send_json(503, APIError(503, str(exc), "server_error").body)
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is answered, not dropped
            self._send_json(500, APIError(500, f"{type(exc).__name__}: {exc}", "server_error").body)

    def do_GET(self) -> None:
        routes = {"/v1/models": self._models, "/health": self._health, "/metrics": self._metrics}
        route = routes.get(self.path.split("?")[0].rstrip("/"))
        self._handle(route or (lambda: self._not_found()))

    def do_POST(self) -> None:
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat,
                  "/v1/embeddings": self._embeddings, "/extras/tokenize": self._tokenize,
                  "/extras/tokenize/count": self._tokenize_count, "/extras/detokenize": self._detokenize}
        route = routes.get(self.path.split("?")[0].rstrip("/"))
        self._handle(route or (lambda: self._not_found()))

    def _not_found(self) -> None:
        raise APIError(404, f"no route {self.command} {self.path}", code="not_found")

    # ---- streaming ----
    def _stream(self, chunks) -> None:
        """Send chunks as server-sent events ending with [DONE]; stop generating if the client goes away."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end (no chunked framing)
        self.end_headers()
        self.close_connection = True
        # A write blocked longer than this means the client stopped reading: it is dropped (TimeoutError),
        # which ends its generation and frees the model for the requests queued behind it.
        self.connection.settimeout(self.service.write_timeout)
        try:
            for chunk in chunks:
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError, AbortedError, ClientGone):
            pass  # the client left, stopped reading, or its generation was aborted (cancelled) because it left
        except Exception as exc:  # noqa: BLE001 - headers are sent: report the failure as the stream's last event
            error = APIError(500, f"{type(exc).__name__}: {exc}", "server_error").body
            try:
                self.wfile.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                self.wfile.flush()
            except OSError:
                pass
        finally:
            chunks.close()  # ends stream_generate now: the sampler is freed and the context stays consistent

    # ---- routes ----
    def _health(self) -> None:
        load = self.service.occupancy()
        batching = {}
        if self.service.batched is not None:  # exact: replies equal lone runs; batched: a step decodes slots together
            engine = self.service.batched.engine
            batching = {"exact_batching": engine.exact, "batched": engine.batched}
        self._send_json(200, {"status": "ok", "busy": load["slots_busy"] > 0 or load["serial_busy"], **load,
                              **batching})

    def _metrics(self) -> None:
        load = self.service.occupancy()
        text = self.service.metrics.prometheus(queue_depth=load["queue_depth"], slots_busy=load["slots_busy"],
                                               slots_total=load["slots_total"])
        self._send_bytes(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model",
                                                          "created": 0, "owned_by": "llmplace", "permissions": []}]})

    def _generate(self, create, stream: bool) -> None:
        """The serial path: run create() while holding the Llama and watching the client; answer (stream or
        JSON)."""
        metrics = self.service.metrics
        with self.service, ClientWatch(self.connection, self.service.abort_serial):
            result = create()
            if stream:
                self._stream(_counted(result, metrics))
                return
        usage = result.get("usage") or {}
        metrics.count_prompt(usage.get("prompt_tokens", 0))
        metrics.count_generated(usage.get("completion_tokens", 0))
        self._send_json(200, result)  # after the model is released: a slow reader delays only itself

    def _generate_batched(self, route: str, payload, options: dict, stream: bool) -> None:
        """The engine path: submit, watch the client (leaving cancels the request: its slot frees at the next
        step), answer (stream or JSON) as the serial path would."""
        batched = self.service.batched
        assert batched is not None  # _takes_engine chose this path
        if client_gone(self.connection):
            raise ClientGone()
        with batched.submitted(route, payload, options) as (request, tokens), \
                ClientWatch(self.connection, request.cancel):
            result = batched.reply(route, request, tokens, payload, self.service.model_name, stream, ClientGone)
            if stream:
                self._stream(result)
                return
        self._send_json(200, result)

    def _takes_engine(self, route: str, options: dict) -> bool:
        batched = self.service.batched
        return batched is not None and batched.serial_reason(route, options) is None

    def _completions(self) -> None:
        body = self._read_body("completions")
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        options = _options(body, _COMPLETION, self.service.max_tokens_limit)
        stream = bool(body.get("stream"))
        if self._takes_engine("completions", options):
            self._generate_batched("completions", prompt, options, stream)
            return
        self._generate(lambda: self.service.llama.create_completion(prompt, stream=stream,
                                                                    model=self.service.model_name, **options),
                       stream)

    def _chat(self) -> None:
        body = self._read_body("chat")
        if body.get("messages") is None:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        options = _options(body, _CHAT, self.service.max_tokens_limit)
        stream = bool(body.get("stream"))
        # a chat with images goes to the Llama, whose chat handler (--mmproj) computes them
        if self._takes_engine("chat", options) and not _has_images(body["messages"]):
            self._generate_batched("chat", body["messages"], options, stream)
            return
        self._generate(lambda: self.service.llama.create_chat_completion(body["messages"], stream=stream,
                                                                         model=self.service.model_name, **options),
                       stream)

    def _embeddings(self) -> None:
        body = self._read_body("embeddings")
        if body.get("input") is None:
            raise APIError(400, "input must be a string or a non-empty list of strings", param="input")
        with self.service, ClientWatch(self.connection, self.service.abort_serial):
            try:
                result = self.service.llama.create_embedding(body["input"], model=self.service.model_name)
            except RuntimeError as exc:  # a model loaded without embedding=True
                if isinstance(exc, AbortedError):
                    raise
                raise APIError(400, f"{exc} (start the server with --embedding)") from None
        self._send_json(200, result)

    def _text_input(self) -> str:
        body = self._read_body("tokenize")
        if body.get("input") is None:
            raise APIError(400, "input must be a string", param="input")
        return body["input"]

    def _tokenize(self) -> None:
        tokens = self.service.llama.tokenize(self._text_input().encode("utf-8"), add_bos=False, special=True)
        self._send_json(200, {"tokens": tokens})

    def _tokenize_count(self) -> None:
        self._send_json(200, {"count": len(self.service.llama.tokenize(self._text_input().encode("utf-8"),
                                                                       add_bos=False, special=True))})

    def _detokenize(self) -> None:
        body = self._read_body("detokenize")
        tokens = body.get("tokens")
        if tokens is None:
            raise APIError(400, "tokens must be a list of token ids", param="tokens")
        text = self.service.llama.detokenize(tokens).decode("utf-8", errors="replace")
        self._send_json(200, {"text": text})


class Server(ThreadingHTTPServer):
    """The HTTP server; server_close() also stops the engine (its requests end with ClosedError)."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of clients connecting at once (32 in the tests)
    # overflows it while the accepting thread waits for the GIL, and the kernel then refuses connections
    request_queue_size = 1024
    engine: Engine | None = None
    started = 0.0  # time.time() when made

    def server_close(self) -> None:
        super().server_close()
        if self.engine is not None:
            self.engine.close()


def check_limits(*, max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_tokens_limit: int | None = None, **_: Any) -> None:
    """InvalidParameterError for a limit no request could live with, before the model loads: a negative
    max_tokens_limit read as "no limit", a timeout of 0, -1 or NaN failed every connection, and max_body_bytes -1
    refused every POST."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_tokens_limit", max_tokens_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidParameterError(f"{name} must be an int >= 1, not {value!r}")
    for name, seconds in (("read_timeout", read_timeout), ("write_timeout", write_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                math.isfinite(seconds) and seconds > 0):
            raise InvalidParameterError(f"{name} must be a number of seconds > 0, not {seconds!r}")


def make_server(llama: Llama, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT,
                write_timeout: float = WRITE_TIMEOUT, max_tokens_limit: int | None = None, slots: int = 1,
                max_queue: int = MAX_QUEUE, engine_options: dict | None = None) -> Server:
    """An HTTP server (not yet serving: call serve_forever()) answering the OpenAI API with `llama`.

    max_body_bytes: larger request bodies are refused (413). read_timeout: seconds a client may take to send
    a request (its socket's timeout while reading). write_timeout: seconds one write may block before the
    client is dropped. max_tokens_limit: the most tokens one request may generate (default: the context size).
    slots: with 2 or more, completions and chats run on an llmplace.Engine of that many slots on the Llama's
    model, each slot holding the Llama's n_ctx tokens (see batching.py for what stays on the Llama); 1: every
    request on the Llama, one at a time. max_queue: requests waiting for a slot (and, separately, for the
    Llama) before the next gets 429. engine_options: the Engine's options; by default the Llama's thread counts,
    flash_attn=False (the Llama's default), and exact=True when every weight is in host memory (replies then equal
    the serial ones, as the CPU's batch kernels allow) but False when a GPU holds weights (a GPU's batch is not
    bit-equal to a lone run, and exact=True would then decode the slots one at a time)."""
    import os

    check_limits(max_body_bytes=max_body_bytes, read_timeout=read_timeout, write_timeout=write_timeout,
                 max_tokens_limit=max_tokens_limit)
    metrics = Metrics()
    batched = None
    if slots > 1 and not llama._embedding:  # an embedding context computes embeddings, not replies
        options = {"n_threads": llama.n_threads, "n_threads_batch": llama.n_threads_batch, "flash_attn": False,
                   **(engine_options or {})}
        if options.get("exact") is None:
            options["exact"] = all(t.memory == "host" for t in llama._model.placement_report())
        # the bound is BatchedGeneration's (requests in flight); the engine's own never refuses before it
        try:
            engine = Engine(llama._model, slots=slots, n_ctx=llama.n_ctx(), n_batch=llama.n_batch,
                            max_queue=max_queue + slots, **options)
        except OutOfMemoryError as exc:
            raise OutOfMemoryError(f"{exc} The server's engine holds {slots} slots of {llama.n_ctx()} tokens "
                                   "(--slots × --n-ctx) besides the Llama's own context: pass a smaller --slots "
                                   "or --n-ctx (--slots 1: no engine, one request at a time)") from None
        batched = BatchedGeneration(llama, engine, metrics, max_queue)
    service = ModelService(llama, model_name or os.path.basename(str(llama.model_path)), api_key,
                           max_body_bytes=max_body_bytes, read_timeout=read_timeout, write_timeout=write_timeout,
                           max_tokens_limit=max_tokens_limit, max_queue=max_queue, batched=batched, metrics=metrics)
    # `timeout` is socketserver's per-connection socket timeout: reading headers and bodies is bounded.
    handler = type("LlmplaceHandler", (Handler,), {"service": service, "timeout": read_timeout})
    try:
        server = Server((host, port), handler)
    except BaseException:
        if batched is not None:
            batched.engine.close()
        raise
    server.engine = batched.engine if batched is not None else None
    server.started = time.time()
    return server
