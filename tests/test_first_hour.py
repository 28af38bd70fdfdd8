"""A newcomer's first hour (issue 19, part 4): the command line, the messages a typo gets, and the small things a
new user meets first (thread default, file modes, free memory)."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import llmplace
from adversarial import outcomes, summary
from llmplace import cli
from llmplace.errors import InvalidParameterError, UnknownKeywordError
from llmplace.placement import Placement, Rule
from llmplace.planning import explain

OUTSIDE_CHECKOUT = Path(tempfile.gettempdir())  # `python -m llmplace...` from the root would import the sources


def run_module(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=OUTSIDE_CHECKOUT)


# ---- the command line ----
def test_version_and_every_subcommand_page_has_a_description(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"llmplace {llmplace.__version__}")
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"devices", "fit", "inspect", "explain", "models", "chat", "serve", "rpc-server"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 15, name
        assert sub.allow_abbrev is False, name


def test_server_takes_llama_cpp_python_flags_and_no_abbreviations():
    from llmplace import server

    parser = argparse.ArgumentParser(allow_abbrev=False)
    server.add_arguments(parser)
    args = parser.parse_args(["--model", "m.gguf", "--n_ctx", "64", "--n_gpu_layers", "0", "--chat_format",
                              "chatml", "--api_key", "k", "--model_alias", "mine", "--use_mmap", "false",
                              "--n_threads", "1", "--tensor_split", "2,1", "--host", "0.0.0.0", "--port", "9"])
    assert (args.model_option, args.model_name, args.n_ctx, args.n_gpu_layers, args.chat_format, args.api_key,
            args.use_mmap, args.threads, args.tensor_split) == ("m.gguf", "mine", 64, 0, "chatml", "k", False, 1,
                                                                [2.0, 1.0])
    with pytest.raises(SystemExit):  # an abbreviation is refused, never read as another option
        parser.parse_args(["--model-n", "x", "m.gguf"])


def test_serve_says_what_is_wrong_in_one_line(tmp_path, smollm2_path):
    missing = run_module("llmplace.cli", "serve", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "no model file at" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        busy = run_module("llmplace.server", "--model", str(smollm2_path), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr
    assert "already in use" in busy.stderr and "--port" in busy.stderr
    assert time.monotonic() - started < 30  # found before the model loads


def test_python_m_server_starts_with_llama_cpp_python_flags(smollm2_path):
    proc = subprocess.Popen([sys.executable, "-m", "llmplace.server", "--model", str(smollm2_path), "--n_ctx",
                             "128", "--n_gpu_layers", "0", "--chat_format", "chatml", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=OUTSIDE_CHECKOUT)
    try:
        line = proc.stderr.readline()
        assert "serving SmolLM2-135M-Instruct.Q4_1.gguf on http://127.0.0.1:" in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fit_png_without_matplotlib_fails_before_the_fit(smollm2_path, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: `import matplotlib` fails
    started = time.monotonic()
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        cli.main(["fit", str(smollm2_path), "--png", str(tmp_path / "fit.png")])
    assert time.monotonic() - started < 5  # no fit ran first
    assert not (tmp_path / "fit.png").exists()


def _memory(name, *, weights=0, mapped=0, kv=0, compute=0, runtime=0, free=None):
    total = weights + kv + compute + runtime
    return SimpleNamespace(memory=name, weights=weights, mapped=mapped, kv=kv, compute=compute, runtime=runtime,
                           free=free, total=total)


def test_terminal_bars_are_to_scale_and_show_every_part():
    mib, gib = 1 << 20, 1 << 30
    small = _memory("host", weights=92 * mib, mapped=92 * mib, kv=180 * mib, compute=98 * mib, free=23 * gib)
    over = _memory("CUDA0", weights=10 * gib, kv=3 * gib, compute=1 * mib)
    result = SimpleNamespace(estimate=SimpleNamespace(memories={"host": small, "CUDA0": over}),
                             budgets={"CUDA0": 12 * gib})
    host_line, gpu_line, legend = cli._memory_bars(result, width=48)
    host_bar = host_line.split("[")[1].split("]")[0]
    assert len(host_bar) == 48 and host_bar.count(".") >= 44  # 370 MiB of 23 GiB: a short bar
    assert {"M", "K", "C"} <= set(host_bar) and "W" not in host_bar  # each present part, even below one char
    assert "of 23.00 GiB free" in host_line
    assert gpu_line.split("]")[0].endswith("!") and "of 12.00 GiB budget" in gpu_line
    assert "R runtime" not in legend and "K KV cache" in legend  # only parts some memory has


def test_fit_png_draws_only_existing_parts(tmp_path):
    pytest.importorskip("matplotlib")
    plt = cli._require_matplotlib()
    gib = 1 << 30
    result = SimpleNamespace(estimate=SimpleNamespace(memories={"host": _memory("host", weights=gib, kv=gib)}),
                             budgets={}, success=True, message="everything fits " * 20)
    cli._save_png(plt, result, str(tmp_path / "fit.png"))
    assert (tmp_path / "fit.png").read_bytes().startswith(b"\x89PNG")


def _wait_for_output(proc, seconds: float) -> str:
    deadline, seen = time.monotonic() + seconds, ""
    while time.monotonic() < deadline and not seen.strip():
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            seen += os.read(proc.stdout.fileno(), 256).decode(errors="replace")
    return seen


def test_ctrl_c_in_chat_stops_the_reply_without_llama_cpp_lines(smollm2_path):
    proc = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "chat", str(smollm2_path), "--prompt",
                             "Write a very long story about dragons.", "--max-tokens", "2000", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE_CHECKOUT)
    assert _wait_for_output(proc, 90), "no reply began"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"[stopped]" in out
    assert b"failed to" not in err and b"decode" not in err, err.decode(errors="replace")


def test_repl_names_an_unknown_command_and_reset_clears_the_kv_use(smollm2_path):
    done = subprocess.run([sys.executable, "-m", "llmplace.cli", "chat", str(smollm2_path), "--max-tokens", "4",
                           "--threads", "1"], input="Hello\n/stats\n/reset\n/stats\n/frobnicate\n",
                          capture_output=True, text=True, timeout=120, cwd=OUTSIDE_CHECKOUT)
    assert done.returncode == 0, done.stderr
    assert "unknown command /frobnicate" in done.stderr
    kv = [int(line.split("KV cache: ")[1].split("/")[0]) for line in done.stderr.splitlines() if "KV cache:" in line]
    assert len(kv) == 2 and 0 < kv[1] < kv[0]  # after /reset: the system prompt's tokens only


# ---- messages ----
KEYWORD_TYPOS = {  # the misspelled keyword -> the name the message must suggest
    "max_token": "llmplace.generate(model, 'hi', max_token=5)",
    "temprature": "llmplace.generate(model, 'hi', temprature=0)",
    "top_kk": "list(llmplace.stream_generate(model, 'hi', top_kk=5))",
    "contxt": "llmplace.generate(model, 'hi', contxt=None)",
    "n_ctxx": "llmplace.Llama(path, n_ctxx=64, verbose=False)",
    "n_gpu_layer": "llmplace.Llama(path, n_gpu_layer=0, verbose=False)",
    "chat_fromat": "llmplace.Llama(path, chat_fromat='chatml', verbose=False)",
    "flash_atn": "llmplace.Llama(path, flash_atn=True, verbose=False)",
}
SUGGESTED = {"max_token": "max_tokens", "temprature": "temperature", "top_kk": "top_k", "contxt": "context",
             "n_ctxx": "n_ctx", "n_gpu_layer": "n_gpu_layers", "chat_fromat": "chat_format", "flash_atn": "flash_attn"}


def test_keyword_typos_name_the_close_keyword(smollm2_path):
    results = outcomes(f"path = {str(smollm2_path)!r}\nmodel = llmplace.load(path)", KEYWORD_TYPOS)
    for typo, outcome in results.items():
        assert outcome.kind == "typed" and outcome.error == "UnknownKeywordError", f"{typo}: {outcome}"
        assert f"did you mean '{SUGGESTED[typo]}'" in outcome.message and "SamplingParams" not in outcome.message
    print(summary(results))
    assert issubclass(UnknownKeywordError, TypeError) and issubclass(UnknownKeywordError, InvalidParameterError)


def test_unmatched_rule_warning_is_short(tiny_llama_path, caplog):
    rule = Rule("cpu", pattern="ffn_" + "x" * 300, layers=range(1000, 4000), role="ffn")
    with caplog.at_level(logging.WARNING, logger="llmplace"):
        explain(tiny_llama_path, Placement([rule]))
    [message] = [r.getMessage() for r in caplog.records if "select no tensor" in r.getMessage()]
    assert len(message) < 300 and "layers=1000-3999" in message and "Rule(" not in message


def test_llama_cpp_flag_advice_is_translated_to_keywords(tiny_llama_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llmplace"):
        with llmplace.load(tiny_llama_path, placement="ffn=CPU", n_gpu_layers=0, use_mmap=True):
            pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "--load-mode" not in text
    if "tensor overrides to CPU" in text:  # llama.cpp gives this advice only where it applies
        assert "use_mmap=False" in text


# ---- small things ----
def test_quantized_file_gets_the_usual_mode(tiny_llama_path, tmp_path):
    previous = os.umask(0o022)
    try:
        out = llmplace.quantize(tiny_llama_path, tmp_path / "q.gguf", "q4_0")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644


def test_cpu_free_memory_is_what_linux_says_is_available():
    cpu = next(d for d in llmplace.devices() if d.kind == "cpu")
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    assert cpu.memory_free < cpu.memory_total
    assert abs(cpu.memory_free - available) < 512 << 20


def test_default_threads_counts_free_physical_cores():
    from llmplace.context import default_threads

    n = default_threads()
    cores = {(Path(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id").read_text(),
              Path(f"/sys/devices/system/cpu/cpu{c}/topology/core_id").read_text())
             for c in os.sched_getaffinity(0)}
    assert 1 <= n <= len(cores)
    if os.getloadavg()[0] >= len(os.sched_getaffinity(0)):
        assert n == 1  # a machine as busy as its cores: one thread, which does not wait at barriers
