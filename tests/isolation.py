"""Run one adversarial case in a process of its own, so that a crash (SIGSEGV, SIGABRT) or a hang fails the test
instead of killing pytest (issue: reliability, "each case running in a subprocess").

A case is Python source that ends by printing one line `RESULT <json>`; `outcome()` classifies what happened:
"typed" (an LlmplaceError subclass was raised: the wanted answer for bad input), "ok" (no error), "untyped"
(another exception), "crash" (killed by a signal or a non-zero exit without a RESULT line), "hang" (timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

# `python -c` puts its working folder first on sys.path: run outside the checkout, whose llmplace/ (without the
# compiled module, unless installed editable) would hide the installed package.
OUTSIDE_CHECKOUT = tempfile.gettempdir()

PRELUDE = """
import json, sys, traceback
import llmplace
from llmplace.errors import LlmplaceError

def report(kind, **data):
    print("RESULT " + json.dumps(dict(kind=kind, **data)), flush=True)

def expect_typed(fn):
    try:
        value = fn()
    except LlmplaceError as exc:
        report("typed", error=type(exc).__name__, message=str(exc)[:500])
    except BaseException as exc:
        report("untyped", error=type(exc).__name__, message=str(exc)[:500], trace=traceback.format_exc()[-1500:])
    else:
        report("ok", value=repr(value)[:200])
"""


@dataclass(frozen=True)
class Outcome:
    kind: str            # "typed", "ok", "untyped", "crash", "hang"
    error: str = ""      # the exception's class name, for typed / untyped
    message: str = ""
    returncode: int | None = None
    stderr: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.error}: {self.message} (rc={self.returncode}) {self.stderr[-800:]}"


def outcome(body: str, *, timeout: float = 60.0, env: dict | None = None) -> Outcome:
    """Run PRELUDE + body in a fresh interpreter; body usually ends with `expect_typed(lambda: ...)`."""
    source = PRELUDE + "\n" + textwrap.dedent(body)
    full_env = dict(os.environ, LLMPLACE_LOG="error", **(env or {}))
    try:
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=OUTSIDE_CHECKOUT)
    except subprocess.TimeoutExpired as exc:
        return Outcome("hang", stderr=(exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes)
                       else (exc.stderr or ""))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return Outcome("crash", returncode=done.returncode, stderr=done.stderr[-3000:])
    data = json.loads(lines[-1][len("RESULT "):])
    return Outcome(data["kind"], data.get("error", ""), data.get("message", ""), done.returncode, done.stderr[-3000:])
