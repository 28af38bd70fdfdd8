"""Run many adversarial cases in few interpreters, yet still know which case crashed or hung.

`isolation.outcome` gives one process per case, ~1 s of import each. Here the cases of one batch share a
process and report one line each; if the process dies (a signal, an abort) or runs out of time, the first
case without a report is the culprit (recorded as "crash" or "hang") and the cases after it run again in a
fresh process. So a crash fails exactly its own case and costs one more start, not the whole batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from isolation import OUTSIDE_CHECKOUT, PRELUDE, Outcome

_RUNNER = """
def _case(name, fn):
    try:
        value = fn()
    except LlmplaceError as exc:
        data = dict(kind="typed", error=type(exc).__name__, message=str(exc)[:500])
    except BaseException as exc:
        data = dict(kind="untyped", error=type(exc).__name__, message=str(exc)[:300] + " | " +
                    traceback.format_exc()[-1200:])
    else:
        data = dict(kind="ok", message=repr(value)[:200])
    print("CASE " + json.dumps(dict(name=name, **data)), flush=True)
"""


def outcomes(setup: str, cases: dict[str, str], *, timeout: float = 120.0,
             env: dict | None = None) -> dict[str, Outcome]:
    """Run `setup` once per process, then each case (an expression: name -> source) in order; return each
    case's Outcome (kind typed / ok / untyped / crash / hang)."""
    results: dict[str, Outcome] = {}
    pending = list(cases)
    full_env = dict(os.environ, LLMPLACE_LOG="error", **(env or {}))
    while pending:
        source = PRELUDE + _RUNNER + textwrap.dedent(setup) + "\n" + "\n".join(
            f"_case({name!r}, lambda: ({cases[name]}))" for name in pending)
        try:
            done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                                  timeout=timeout, env=full_env, cwd=OUTSIDE_CHECKOUT)
            stdout, stderr, failure = done.stdout, done.stderr, ("crash" if done.returncode else None)
            returncode = done.returncode
        except subprocess.TimeoutExpired as exc:
            decode = lambda s: s.decode(errors="replace") if isinstance(s, bytes) else (s or "")  # noqa: E731
            stdout, stderr, failure, returncode = decode(exc.stdout), decode(exc.stderr), "hang", None
        for line in stdout.splitlines():
            if line.startswith("CASE "):
                data = json.loads(line[5:])
                results[data["name"]] = Outcome(data["kind"], data.get("error", ""), data.get("message", ""),
                                                returncode, "")
        pending = [name for name in pending if name not in results]
        if pending:
            # The process ended (or stalled) inside the first case that did not report.
            results[pending.pop(0)] = Outcome(failure or "crash", returncode=returncode, stderr=stderr[-3000:])
    return results


def summary(results: dict[str, Outcome]) -> str:
    """One line per case, for assertion messages and the closing counts."""
    return "\n".join(f"{name}: {result}" for name, result in results.items())
