"""A load generator for `llmplace serve`: N concurrent streaming clients, aggregate tokens/s, time to first token
and inter-token latency (p50 / p99), as JSON.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--clients 1,4,8,32] [--max-tokens 32]
    python benchmarks/serve_load.py --model MODEL.gguf --slots 1,4 [--threads 1] [--clients 1,4,8] --out F.json

With --model, each --slots value gets a server of its own (`python -m llmplace.server MODEL --slots S`, on a
free port of 127.0.0.1, stopped afterwards). Bounded: only 127.0.0.1 / localhost is spoken to; each level
(clients count) sends at most --requests requests (default: 2 per client, at least 8) and starts none after
--duration seconds; every request has a --timeout. Each client sends streaming /v1/completions requests one
after the other (temperature 0, varied prompts; --ban-tokens makes every reply run to --max-tokens) and
reads the SSE events as they come. Measured per level: generated tokens (events with text) over the level's
wall time; TTFT = request sent → first text event; ITL = gaps between text events of one reply; errors by
kind. The machine's load average is recorded (other processes share the CPU).

--baseline (with --model): also the same requests submitted straight to an in-process llmplace.Engine of the
same slots (no HTTP, no server threads), for the cost of the HTTP layer: the standard library's threading
server is kept only while it stays close to this figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

PROMPTS = ["Once upon a time", "The three primary colors are", "def fib(n):", "List five fruits:\n1.",
           "The history of the old harbour town is", "Q: What is the capital of France?\nA:",
           "Write a short poem about the sea.", "In 1969, the first"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def one_request(host: str, port: int, body: dict, timeout: float, api_key: str | None) -> dict:
    """Send one streaming completion; the times of its text events (perf_counter) and how it ended."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    sent = time.perf_counter()
    events: list[float] = []
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), headers)
        response = connection.getresponse()
        if response.status != 200:
            return {"sent": sent, "events": events, "error": f"HTTP {response.status}"}
        done = False
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"sent": sent, "events": events, "error": "error event"}
            if chunk["choices"][0].get("text"):
                events.append(time.perf_counter())
        return {"sent": sent, "events": events, "error": None if done else "stream ended without [DONE]"}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"sent": sent, "events": events, "error": type(exc).__name__}
    finally:
        connection.close()


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) of a process so far; None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process (MiB); None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kib / 1024, 1)
    except (OSError, ValueError, StopIteration):
        return None


def run_level(host: str, port: int, clients: int, *, requests: int, duration: float, max_tokens: int,
              timeout: float, ban: dict, api_key: str | None, server_pid: int | None = None) -> dict:
    """`clients` threads sending requests one after another until `requests` were sent or `duration` passed.
    server_pid (a server on this machine): its CPU seconds per generated token are measured too (CPU time
    does not depend on what else runs, as wall time does)."""
    lock = threading.Lock()
    counter = {"next": 0}
    results: list[dict] = []
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                index = counter["next"]
                if index >= requests or time.perf_counter() - start > duration:
                    return
                counter["next"] += 1
            body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True}
            if ban:
                body["logit_bias"] = ban
            result = one_request(host, port, body, timeout, api_key)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    load_before = os.getloadavg()[0]
    cpu_before, rss_before = _cpu_seconds(server_pid), _rss_mib(server_pid)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu_after = _cpu_seconds(server_pid)
    tokens = sum(len(r["events"]) for r in results)
    ttft = [r["events"][0] - r["sent"] for r in results if r["events"]]
    itl = [b - a for r in results for a, b in zip(r["events"], r["events"][1:])]
    errors: dict[str, int] = {}
    for r in results:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
        elif ban and len(r["events"]) < max_tokens // 2:
            # with the end tokens banned every reply runs to max_tokens (a text event a token, give or take a
            # token that completes a character): a much shorter one was cut off by the server
            errors["reply cut short"] = errors.get("reply cut short", 0) + 1
    ms = 1000.0
    return {"clients": clients, "requests": len(results), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_ms": {"p50": round(percentile(ttft, 50) * ms, 1) if ttft else None,
                        "p99": round(percentile(ttft, 99) * ms, 1) if ttft else None},
            "itl_ms": {"p50": round(percentile(itl, 50) * ms, 2) if itl else None,
                       "p99": round(percentile(itl, 99) * ms, 2) if itl else None,
                       "mean": round(statistics.fmean(itl) * ms, 2) if itl else None},
            "server_cpu_ms_per_token": round((cpu_after - cpu_before) * ms / max(tokens, 1), 2)
            if cpu_before is not None and cpu_after is not None else None,
            "server_rss_mib": {"before": rss_before, "after": _rss_mib(server_pid)},
            "errors": errors, "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2)}


def engine_baseline(model_path: str, slots: int, threads: int, n_ctx: int, clients: int, requests: int,
                    max_tokens: int, ban: dict) -> dict:
    """The requests of one level submitted to an Engine in this process, `clients` at a time: tokens/s."""
    import llmplace

    with llmplace.load(model_path, progress=False) as model, \
            llmplace.Engine(model, slots=slots, n_ctx=n_ctx, n_threads=threads, flash_attn=False) as engine:
        bias = {int(t): float(v) for t, v in ban.items()}
        engine.generate("Hello", max_tokens=2, temperature=0)  # warm
        start, cpu_start = time.perf_counter(), time.process_time()
        tokens = 0
        for first in range(0, requests, clients):
            handles = [engine.submit(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0, logit_bias=bias)
                       for i in range(first, min(first + clients, requests))]
            tokens += sum(len(h.result().tokens) for h in handles)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"clients": clients, "requests": requests, "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "cpu_ms_per_token": round(cpu * 1000 / max(tokens, 1), 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, alive, timeout: float) -> str | None:
    """Poll GET path on 127.0.0.1:port until it answers 200 (llama-server answers 503 while it loads); the reason
    it never did (alive() turned false, or timeout seconds passed), or None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return None
        except OSError:
            pass
        if not alive():
            return "the server exited before it was ready"
        if time.monotonic() > deadline:
            return f"the server did not answer {path} within {timeout:.0f} s"
        time.sleep(0.2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start_server(model: str, slots: int, threads: int, n_ctx: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmplace.server", model, "--host", "127.0.0.1", "--port",
                                str(port), "--slots", str(slots), "--threads", str(threads), "--n-ctx", str(n_ctx)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    problem = wait_ready(port, "/health", lambda: process.poll() is None, 120)
    if problem:
        process.kill()
        raise RuntimeError(f"{problem}: {process.stderr.read().decode(errors='replace')[-2000:]}")
    return process, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, http://127.0.0.1:PORT")
    target.add_argument("--model", help="start `llmplace serve MODEL` for each --slots value")
    parser.add_argument("--slots", default="1,4", help="with --model: the servers' --slots values")
    parser.add_argument("--threads", type=int, default=1, help="with --model: the servers' --threads")
    parser.add_argument("--n-ctx", type=int, default=1024, help="with --model: the servers' --n-ctx")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients per level, e.g. 1,4,8,32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 × clients))")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds after which a level sends no more")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--ban-tokens", default="", help="token ids to ban (end tokens: replies run to max-tokens); "
                                                         "SmolLM2: 0,2")
    parser.add_argument("--baseline", action="store_true",
                        help="with --model: also the same requests on an in-process Engine (no HTTP)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--note", default="", help="a note kept in the JSON (what else ran on the machine)")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--wait-ready", metavar="PATH",
                        help="with --url: only wait until GET PATH answers 200 (at most 300 s), then exit; "
                             "--server-pid: fail at once if that process ends first")
    parser.add_argument("--server-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.wait_ready:
        if not args.url or urlparse(args.url).hostname not in LOCAL_HOSTS:
            parser.error("--wait-ready needs --url of a server on this machine (127.0.0.1 or localhost)")
        port, pid = urlparse(args.url).port or 80, args.server_pid
        problem = wait_ready(port, args.wait_ready, (lambda: _pid_alive(pid)) if pid else (lambda: True), 300)
        if problem:
            print(f"{args.note or args.url}: {problem}", file=sys.stderr)
            return 1
        return 0
    clients = [int(c) for c in args.clients.split(",")]
    ban = {t.strip(): -100 for t in args.ban_tokens.split(",") if t.strip()}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "note": args.note, "servers": []}

    def levels(port: int, pid: int | None = None) -> list[dict]:
        out = []
        for n in clients:
            requests = args.requests or max(8, 2 * n)
            level = run_level("127.0.0.1", port, n, requests=requests, duration=args.duration,
                              max_tokens=args.max_tokens, timeout=args.timeout, ban=ban, api_key=args.api_key,
                              server_pid=pid)
            print(json.dumps(level), file=sys.stderr, flush=True)
            out.append(level)
        return out

    if args.url:
        url = urlparse(args.url)
        if url.hostname not in LOCAL_HOSTS:
            parser.error(f"only a server on this machine is loaded (127.0.0.1 or localhost), not {url.hostname}")
        report["servers"].append({"url": args.url, "levels": levels(url.port or 80)})
    else:
        report["model"] = os.path.basename(args.model)
        for slots in [int(s) for s in args.slots.split(",")]:
            process, port = start_server(args.model, slots, args.threads, args.n_ctx)
            try:
                report["servers"].append({"slots": slots, "threads": args.threads,
                                          "levels": levels(port, process.pid)})
            finally:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if args.baseline and slots > 1:  # the server is stopped: the baseline has the CPU to itself
                report["servers"][-1]["engine_baseline"] = [
                    engine_baseline(args.model, slots, args.threads, args.n_ctx, n, args.requests or max(8, 2 * n),
                                    args.max_tokens, ban) for n in clients]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
