"""ruff and mypy over the checkout, with the settings in pyproject.toml ([tool.ruff], [tool.mypy]): CI runs them
here, through the README's test command. Both are pinned in the `test` extra, since a new release may add rules.

mypy checks llmplace/ (the modules users import with --strict's flags); ruff checks every Python file of the
project. Either failing prints what it reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF_PATHS = ["llmplace", "tests", "benchmarks", "tools", "plugins"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(module, reason=f"{module} is in the test extra: pip install -e '.[test]'")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff_is_clean():
    result = _run("ruff", "check", "--no-cache", *RUFF_PATHS)
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_mypy_is_clean():
    # The configuration names the files (llmplace) and the strict modules; the cache (.mypy_cache, ignored
    # by git) makes a second run take seconds.
    result = _run("mypy")
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
