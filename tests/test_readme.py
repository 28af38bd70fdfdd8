"""The README is executed: every ```python block runs in a fresh interpreter, in an empty folder (the blocks
write conversation.json, model-q4_0.gguf, style-lora.gguf there), on real small models.

Substitutions, the same for every block (README "Examples" says so too): the string literal "model.gguf" is
SmolLM2-135M-Instruct, "qwen3-30b-a3b.gguf" the tiny synthetic Qwen3-MoE model of tests/models.py. A block
preceded by `<!-- readme-test: skip (reason) -->` is not run; the reason must say why (a GPU, a remote server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, source, skip reason or None) of every ```python block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = SKIP_MARK.search(previous)
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", mark["reason"] if mark else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_its_examples_and_every_skip_has_a_reason():
    assert len(BLOCKS) >= 9
    runnable = [b for b in BLOCKS if b[2] is None]
    assert len(runnable) >= len(BLOCKS) - 2  # a skip is the exception
    assert all(reason.strip() for _, _, reason in BLOCKS if reason is not None)


@pytest.mark.parametrize("line, source, skip", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, source, skip, tmp_path, smollm2_path, tiny_qwen3moe_path):
    if skip is not None:
        pytest.skip(skip)
    substituted = source.replace('"model.gguf"', repr(str(smollm2_path))).replace(
        '"qwen3-30b-a3b.gguf"', repr(str(tiny_qwen3moe_path)))
    done = subprocess.run([sys.executable, "-c", substituted], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env={**__import__("os").environ, "LLMPLACE_LOG": "error"})
    assert done.returncode == 0, f"README.md line {line} failed:\n{source}\n--- stderr:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"README.md line {line} printed nothing"
