"""The `llmplace` command: devices, inspect, chat."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


from llmplace.cli import main


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # Run outside the checkout: from its root, `python -m` would import the source folder, which has no
    # compiled module, instead of the installed package.
    return subprocess.run([sys.executable, "-m", "llmplace.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(tempfile.gettempdir()))


def test_devices_lists_the_cpu(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "CPU" in out and "cpu" in out
    assert main(["devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "CPU" and rows[0]["memory_total"] > 0


def test_inspect_shows_metadata_and_tensor_table(smollm2_path, capsys):
    assert main(["inspect", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    assert "general.architecture" in out and "'llama'" in out
    assert "blk.0.attn_q.weight" in out and "Q4_1" in out
    assert main(["inspect", str(smollm2_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tensors"]) == 272
    assert data["metadata"]["llama.block_count"] == 30


def test_chat_one_shot_uses_the_embedded_default_model():
    out = run_cli("chat", "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "embedded default SmolLM2-135M-Instruct" in out.stderr
    assert "Paris" in out.stdout


def test_chat_reports_a_bad_model_path_without_a_traceback(tmp_path):
    out = run_cli("chat", str(tmp_path / "missing.gguf"), "--prompt", "hi")
    assert out.returncode == 1
    assert "model file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_inspect_of_a_non_gguf_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model at all, just text" * 4)
    assert main(["inspect", str(bad)]) == 1
    assert "not a GGUF file" in capsys.readouterr().err


def test_explain_prints_totals_and_rules(tiny_qwen3moe_path, capsys):
    assert main(["explain", str(tiny_qwen3moe_path), "--rule", "exps=cpu", "--rule", "nothing-here=cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU" in out and "rule 0: exps=cpu: 6 tensors" in out and "(matched nothing)" in out
    assert main(["explain", str(tiny_qwen3moe_path), "--rule", "exps=cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(1 for t in data["tensors"] if t["rule"] == 0) == 6
    assert main(["explain", str(tiny_qwen3moe_path), "--rule", "exps(=cpu"]) == 1
    assert "invalid tensor pattern" in capsys.readouterr().err


def test_rpc_server_command_serves_on_the_given_port():
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "rpc-server", "--port", str(port),
                               "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(tempfile.gettempdir()))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode(errors="replace")
                assert time.monotonic() < deadline, "the RPC server did not start listening"
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bad_numbers_are_one_line_errors_not_tracebacks(smollm2_path, tiny_qwen3moe_path):
    # --tensor-split abc raised a ValueError traceback; fit --ctx 99999999999 an OverflowError after the dry run
    # had spent a minute reserving
    split = run_cli("explain", str(smollm2_path), "--tensor-split", "abc")
    assert split.returncode == 2 and "expected numbers separated by commas" in split.stderr
    fit = run_cli("fit", str(smollm2_path), "--ctx", "99999999999")
    assert fit.returncode == 1 and "n_ctx must be an int between 0 and" in fit.stderr
    assert "Traceback" not in split.stderr + fit.stderr


def test_a_huge_n_cpu_moe_means_every_layer_not_minutes_of_rules(tiny_qwen3moe_path):
    import llmplace
    from llmplace.placement import n_cpu_moe

    # one rule per layer index up to n: 10^7 rules took minutes to build and to match
    assert len(n_cpu_moe(10**7).rules) == len(n_cpu_moe(999).rules) == 512
    every = llmplace.explain(tiny_qwen3moe_path, n_cpu_moe(10**7))
    assert all(t.memory == "host" for t in every.tensors if "_exps" in t.name)
