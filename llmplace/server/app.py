"""The OpenAI-compatible HTTP API over one llmplace.Llama, on the standard library's threading HTTP server.

Requests are served one at a time (a FIFO queue in front of the model): a small model on one context computes
one sequence at a time anyway, and queued requests wait instead of failing. A streaming client that
disconnects stops its generation at the next token, which frees the model for the next request.
Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..compat import Llama, UnsupportedFeatureError
from ..errors import ClosedError, ContextOverflowError

# Request fields passed through to create_completion / create_chat_completion (OpenAI's, plus llama.cpp's).
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed",
             "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias")
_COMPLETION = _SAMPLING + ("suffix", "echo", "logprobs")
_CHAT = _SAMPLING + ("response_format", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                     "function_call")


class APIError(Exception):
    """An error to answer with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


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
    """The model behind the API, its public name, the optional API key, and the request queue."""

    def __init__(self, llama: Llama, model_name: str, api_key: str | None = None) -> None:
        self.llama, self.model_name, self.api_key = llama, model_name, api_key
        self.queue = FifoLock()
        self.busy = 0  # requests holding the model (0 or 1): /health reports it

    def __enter__(self) -> ModelService:
        self.queue.__enter__()
        self.busy += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self.busy -= 1
        self.queue.__exit__(*exc_info)


def _options(body: dict, names: tuple) -> dict:
    return {name: body[name] for name in names if name in body and body[name] is not None}


class Handler(BaseHTTPRequestHandler):
    server_version = "llmplace"
    protocol_version = "HTTP/1.1"
    service: ModelService  # set on the subclass make_server creates

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the access log would go to stderr for every request

    # ---- plumbing ----
    def _send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _authorize(self) -> None:
        key = self.service.api_key
        if key and self.path.split("?")[0].rstrip("/") != "/health" and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", code="invalid_api_key")

    def _handle(self, route) -> None:
        try:
            self._authorize()
            route()
        except APIError as exc:
            self._send_json(exc.status, exc.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
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
        routes = {"/v1/models": self._models,
                  "/health": lambda: self._send_json(200, {"status": "ok", "busy": self.service.busy > 0})}
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
        try:
            for chunk in chunks:
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
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
    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model",
                                                          "created": 0, "owned_by": "llmplace", "permissions": []}]})

    def _check_n(self, body: dict) -> None:
        if body.get("n", 1) not in (1, None):
            raise APIError(400, "n > 1 is not supported: send n requests", param="n")

    def _completions(self) -> None:
        body = self._read_body()
        self._check_n(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) > 1:
                raise APIError(400, "a list of several prompts is not supported: send one request per prompt",
                               param="prompt")
            prompt = prompt[0]
        options = _options(body, _COMPLETION)
        stream = bool(body.get("stream"))
        with self.service:
            result = self.service.llama.create_completion(prompt, stream=stream, model=self.service.model_name,
                                                          **options)
            self._stream(result) if stream else self._send_json(200, result)

    def _chat(self) -> None:
        body = self._read_body()
        self._check_n(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        options = _options(body, _CHAT)
        stream = bool(body.get("stream"))
        with self.service:
            result = self.service.llama.create_chat_completion(messages, stream=stream,
                                                               model=self.service.model_name, **options)
            self._stream(result) if stream else self._send_json(200, result)

    def _embeddings(self) -> None:
        body = self._read_body()
        inputs = body.get("input")
        if not isinstance(inputs, (str, list)) or not inputs:
            raise APIError(400, "input must be a string or a non-empty list of strings", param="input")
        with self.service:
            try:
                result = self.service.llama.create_embedding(inputs, model=self.service.model_name)
            except RuntimeError as exc:  # a model loaded without embedding=True
                raise APIError(400, f"{exc} (start the server with --embedding)") from None
        self._send_json(200, result)

    def _tokenize(self) -> None:
        body = self._read_body()
        text = body.get("input")
        if not isinstance(text, str):
            raise APIError(400, "input must be a string", param="input")
        tokens = self.service.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        self._send_json(200, {"tokens": tokens})

    def _tokenize_count(self) -> None:
        body = self._read_body()
        text = body.get("input")
        if not isinstance(text, str):
            raise APIError(400, "input must be a string", param="input")
        self._send_json(200, {"count": len(self.service.llama.tokenize(text.encode("utf-8"), add_bos=False,
                                                                       special=True))})

    def _detokenize(self) -> None:
        body = self._read_body()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise APIError(400, "tokens must be a list of token ids", param="tokens")
        text = self.service.llama.detokenize(tokens).decode("utf-8", errors="replace")
        self._send_json(200, {"text": text})


def make_server(llama: Llama, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                api_key: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call serve_forever()) answering the OpenAI API with `llama`."""
    import os

    service = ModelService(llama, model_name or os.path.basename(str(llama.model_path)), api_key)
    handler = type("LlmplaceHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.started = time.time()
    return server
