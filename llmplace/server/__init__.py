"""An OpenAI-compatible HTTP server over llmplace.Llama: `llmplace serve MODEL` or `python -m llmplace.server MODEL`.

Endpoints: GET /v1/models, POST /v1/completions, /v1/chat/completions (with "stream": true, server-sent events
ending in `data: [DONE]`), /v1/embeddings (when started with --embedding), /extras/tokenize,
/extras/tokenize/count, /extras/detokenize; GET /health. With an API key, requests must send
`Authorization: Bearer <key>`. One request runs at a time, the others wait in arrival order (see app.py).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "make_server", "serve"]


def make_server(*args, **kwargs):
    """See app.make_server (imported on use: `llmplace --help` should not load the native library)."""
    from .app import make_server as make

    return make(*args, **kwargs)


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, server_options: dict | None = None, **llama_kwargs) -> None:
    """Load `model_path` with llmplace.Llama(**llama_kwargs) and answer the OpenAI API until interrupted.
    server_options: make_server's limits (max_body_bytes, read_timeout, write_timeout, max_tokens_limit)."""
    from ..compat import Llama

    llama_kwargs.setdefault("verbose", False)
    with Llama(model_path, **llama_kwargs) as llama:
        server = make_server(llama, host=host, port=port, model_name=model_name, api_key=api_key,
                             **(server_options or {}))
        print(f"llmplace: serving {os.path.basename(model_path)} on http://{host}:{server.server_port}/v1",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLMPLACE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLMPLACE_API_KEY, or none)")
    parser.add_argument("--model-name", default=None, help="the model id clients see (default: the file name)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (0 = the trained size)")
    parser.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU (-1 = all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--override-tensor", "-ot", default=None, help="placement rules, llama.cpp -ot syntax")
    parser.add_argument("--n-cpu-moe", type=int, default=None, help="keep the experts of the first N layers in RAM")
    parser.add_argument("--embedding", action="store_true", help="serve /v1/embeddings (the model runs in "
                                                                   "embedding mode)")
    parser.add_argument("--chat-format", default=None, help="chat template name (default: the model's own)")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="the most tokens one request may generate (default: the context size)")
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request")
    parser.add_argument("--write-timeout", type=float, default=10.0,
                        help="seconds a write may block on a client that does not read before it is dropped")


def run(args: argparse.Namespace) -> int:
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
          override_tensor=args.override_tensor, n_cpu_moe=args.n_cpu_moe, embedding=args.embedding,
          chat_format=args.chat_format,
          server_options=dict(max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                              read_timeout=args.read_timeout, write_timeout=args.write_timeout))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmplace.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
