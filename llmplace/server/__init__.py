"""An OpenAI-compatible HTTP server over llmplace.Llama: `llmplace serve MODEL` or `python -m llmplace.server MODEL`.

Endpoints: GET /v1/models, POST /v1/completions, /v1/chat/completions (with "stream": true, server-sent events
ending in `data: [DONE]`), /v1/embeddings (when started with --embedding), /extras/tokenize,
/extras/tokenize/count, /extras/detokenize; GET /health, GET /metrics (Prometheus text). With an API key,
requests must send `Authorization: Bearer <key>` (/health excepted).

`--slots N` (default 4): completions and chats are decoded together on an llmplace.Engine of N slots
(server/batching.py says which requests stay on the one Llama); `--slots 1`: every request on the Llama, one
at a time, the others waiting in arrival order (see app.py). `--max-queue`: waiting requests beyond it get 429.

Why the standard library's threading server and not an ASGI stack (Starlette / uvicorn): the model work runs
in the engine's one scheduler thread and in C; a connection's thread only turns steps into SSE lines. Measured
with benchmarks/serve_load.py on the 2-core CI-like machine (README, "Serving the OpenAI API"): the server
process spent 11-17 ms of CPU per generated token at 1-32 streaming clients, the same requests on an
in-process Engine without HTTP 10-15 ms (the difference is inside the run-to-run noise), and framing and
writing one SSE chunk costs ~9 µs; 32 concurrent clients get zero errors. An ASGI stack could save only part
of that, so no dependency is added.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .defaults import MAX_QUEUE, SLOTS

__all__ = ["main", "make_server", "serve"]


def make_server(*args, **kwargs):
    """See app.make_server (imported on use: `llmplace --help` should not load the native library)."""
    from .app import make_server as make

    return make(*args, **kwargs)


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, server_options: dict | None = None, **llama_kwargs) -> None:
    """Load `model_path` with llmplace.Llama(**llama_kwargs) and answer the OpenAI API until interrupted.
    server_options: make_server's limits (max_body_bytes, read_timeout, write_timeout, max_tokens_limit) and
    batching (slots, max_queue, engine_options)."""
    from ..compat import Llama
    from .app import check_limits

    check_limits(**(server_options or {}))  # before the model loads
    llama_kwargs.setdefault("verbose", False)
    with Llama(model_path, **llama_kwargs) as llama:
        options = dict(server_options or {})
        # the engine computes as the Llama does: its flash attention setting (off by default, as the Llama's),
        # unless engine_options say otherwise
        options["engine_options"] = {"flash_attn": bool(llama_kwargs.get("flash_attn")),
                                     **(options.get("engine_options") or {})}
        server = make_server(llama, host=host, port=port, model_name=model_name, api_key=api_key, **options)
        print(f"llmplace: serving {os.path.basename(model_path)} on http://{host}:{server.server_port}/v1",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


def _flag_bool(text: str) -> bool:
    """llama-cpp-python's server reads booleans as words (`--use_mmap false`)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _split_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 2,1, not {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """llmplace's options; llama-cpp-python's server spellings (`--model`, `--n_ctx`, `--n_gpu_layers`,
    `--chat_format`, `--api_key`, `--model_alias` ...) are accepted too, so its command lines carry over.
    Abbreviations are refused: `--model` must never be taken as `--model-name`."""
    parser.allow_abbrev = False
    parser.add_argument("model", nargs="?", help="GGUF model file (or --model FILE)")
    parser.add_argument("--model", "-m", dest="model_option", metavar="FILE", help="GGUF model file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("LLMPLACE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLMPLACE_API_KEY, or none)")
    parser.add_argument("--model-name", "--model_alias", dest="model_name", default=None,
                        help="the model id clients see (default: the file name)")
    parser.add_argument("--n-ctx", "--n_ctx", dest="n_ctx", type=int, default=4096,
                        help="context size in tokens (0 = the trained size)")
    parser.add_argument("--n-batch", "--n_batch", dest="n_batch", type=int, default=512)
    parser.add_argument("--n-ubatch", "--n_ubatch", dest="n_ubatch", type=int, default=512)
    parser.add_argument("--n-gpu-layers", "--n_gpu_layers", "-ngl", dest="n_gpu_layers", type=int, default=-1,
                        help="layers on the GPU (-1 = all)")
    parser.add_argument("--main-gpu", "--main_gpu", dest="main_gpu", type=int, default=0)
    parser.add_argument("--tensor-split", "--tensor_split", dest="tensor_split", type=_split_list, default=None,
                        help="share of each GPU, e.g. 2,1")
    parser.add_argument("--threads", "--n_threads", "-t", dest="threads", type=int, default=None,
                        help="generation threads (default: the free physical cores)")
    parser.add_argument("--n-threads-batch", "--n_threads_batch", dest="n_threads_batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--flash-attn", "--flash_attn", dest="flash_attn", type=_flag_bool, default=None,
                        metavar="{true,false}")
    parser.add_argument("--use-mmap", "--use_mmap", dest="use_mmap", type=_flag_bool, default=True,
                        metavar="{true,false}")
    parser.add_argument("--use-mlock", "--use_mlock", dest="use_mlock", type=_flag_bool, default=False,
                        metavar="{true,false}")
    parser.add_argument("--override-tensor", "-ot", default=None, help="placement rules, llama.cpp -ot syntax")
    parser.add_argument("--n-cpu-moe", type=int, default=None, help="keep the experts of the first N layers in RAM")
    parser.add_argument("--embedding", nargs="?", const=True, default=False, type=_flag_bool,
                        help="serve /v1/embeddings (the model runs in embedding mode)")
    parser.add_argument("--mmproj", "--clip_model_path", dest="mmproj", default=None,
                        help="a multimodal projector GGUF (mmproj) for the model: chat messages may then carry "
                             "image_url parts (data: URLs, or local paths)")
    parser.add_argument("--allow-image-fetch", action="store_true",
                        help="with --mmproj: also fetch http(s) image URLs (off: a client could make the server "
                             "fetch any address)")
    parser.add_argument("--chat-format", "--chat_format", dest="chat_format", default=None,
                        help="chat template name (default: the model's own)")
    parser.add_argument("--reasoning-format", "--reasoning_format", dest="reasoning_format", default="auto",
                        choices=("none", "auto", "deepseek", "deepseek-legacy"),
                        help="for models that think: 'auto' puts the thinking in reasoning_content, 'none' leaves "
                             "it in content (llama-server's option; a request's reasoning_format overrides it)")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="the most tokens one request may generate (default: the context size)")
    parser.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413")
    parser.add_argument("--slots", "--parallel", "-np", dest="slots", type=int, default=SLOTS,  # llama-server's
                        help="requests decoded together on the batching engine, each slot holding --n-ctx tokens "
                             f"(default {SLOTS}; 1 = one request at a time on one context, the least memory)")
    parser.add_argument("--exact-batching", choices=("auto", "on", "off"), default="auto",
                        help="on: every reply equals the same request run alone (slots are batched only where the "
                             "batch kernels give bit-equal rows, as on the CPU); off: always batch (a GPU's batch "
                             "differs from a lone run at near-ties); auto (default): on when every weight is in "
                             "host memory, off when a GPU holds weights")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                        help=f"requests that may wait for a slot; more get 429 with Retry-After (default {MAX_QUEUE})")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request")
    parser.add_argument("--write-timeout", type=float, default=10.0,
                        help="seconds a write may block on a client that does not read before it is dropped")


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, found before the model loads (seconds to minutes)."""
    import socket

    if not 0 <= port <= 65535:
        return f"--port must be between 0 and 65535, not {port}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds
            probe.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}" + (
            "; another program uses this port: choose another with --port" if exc.errno == errno.EADDRINUSE else "")
    return None


def run(args: argparse.Namespace) -> int:
    """Serve as the command line says; a bad model path, port or load prints one line (no traceback) and
    returns 1."""
    from ..errors import LlmplaceError

    model = args.model_option or args.model
    if args.model_option and args.model and args.model_option != args.model:
        print(f"llmplace: two models given ({args.model} and --model {args.model_option}); pass one",
              file=sys.stderr)
        return 2
    if not model:
        print("llmplace: no model given; pass a GGUF file: llmplace serve MODEL.gguf (or --model MODEL.gguf)",
              file=sys.stderr)
        return 2
    if not os.path.isfile(model):
        print(f"llmplace: no model file at {model}" + (" (a directory)" if os.path.isdir(model) else ""),
              file=sys.stderr)
        return 1
    if not 1 <= args.slots <= 256:  # the Engine's bound: every slot is a KV cache of --n-ctx tokens
        print(f"llmplace: --slots must be between 1 and 256, not {args.slots}", file=sys.stderr)
        return 2
    if args.max_queue < 1:
        print(f"llmplace: --max-queue must be at least 1, not {args.max_queue}", file=sys.stderr)
        return 2
    problem = _cannot_listen(args.host, args.port)
    if problem:
        print(f"llmplace: {problem}", file=sys.stderr)
        return 1
    engine_options = {"exact": {"auto": None, "on": True, "off": False}[args.exact_batching]}
    optional = {name: getattr(args, name) for name in ("flash_attn", "seed", "tensor_split")
                if getattr(args, name) is not None}
    if args.mmproj is not None:
        from ..compat._images import MTMDChatHandler

        try:
            optional["chat_handler"] = MTMDChatHandler(args.mmproj, allow_fetch=args.allow_image_fetch)
        except ValueError as exc:
            print(f"llmplace: --mmproj: {exc}", file=sys.stderr)
            return 1
    try:
        serve(model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
              n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch, n_gpu_layers=args.n_gpu_layers,
              main_gpu=args.main_gpu, n_threads=args.threads, n_threads_batch=args.n_threads_batch,
              use_mmap=args.use_mmap, use_mlock=args.use_mlock, override_tensor=args.override_tensor,
              n_cpu_moe=args.n_cpu_moe, embedding=args.embedding, chat_format=args.chat_format,
              reasoning_format=args.reasoning_format,
              server_options=dict(max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                                  read_timeout=args.read_timeout, write_timeout=args.write_timeout,
                                  slots=args.slots, max_queue=args.max_queue,
                                  engine_options=engine_options),
              **optional)
    except (LlmplaceError, ValueError, OSError) as exc:
        # the model did not load, an option was refused, or the port was taken after the check above
        print(f"llmplace: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmplace.server", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_arguments(parser)
    return run(parser.parse_args(argv))
