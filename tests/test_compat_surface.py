"""llama-cpp-python 0.3.36's public surface, checked name by name against llmplace.compat (issue 16).

Every public name of every module llama-cpp-python ships (tests/upstream_surface.py reads them from its source),
every public member of its classes and every parameter of its callables must exist in llmplace.compat at the same
module path (after install()'s aliasing: llmplace.compat._install.ALIASES) with a compatible signature, or be
listed with its reason in llmplace.compat.surface.EXCLUDED. Constants must have upstream's values.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import tempfile
import typing
from fnmatch import fnmatchcase
from functools import cache

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the surface comparison needs llama-cpp-python 0.3.36")

import upstream_surface  # noqa: E402  (tests/upstream_surface.py)

from llmplace.compat._install import ALIASES  # noqa: E402
from llmplace.compat.surface import EXCLUDED, exclusion_reason  # noqa: E402

SIMPLE_VALUES = (type(None), bool, int, float, str, bytes)
_MISSING = object()


@cache
def _import(module: str):
    """The module, or None when it cannot be imported here (upstream's server needs fastapi, llava its library)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _ours(upstream_module: str):
    target = ALIASES.get(upstream_module)
    return None if target is None else importlib.import_module(target)


def _is_typeddict(obj) -> bool:
    return isinstance(obj, type) and typing.is_typeddict(obj)


# ---- signatures ----

def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and ctypes functions without one
        return None


def signature_problems(upstream, ours) -> list[tuple[str, str]]:
    """[(parameter, what differs)]: where a call that is valid for upstream's signature would not bind to the
    same parameters of ours, or binds with a different default."""
    up_sig, our_sig = _signature(upstream), _signature(ours)
    if up_sig is None or our_sig is None:
        return []
    P = inspect.Parameter
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    up_params, our_params = list(up_sig.parameters.values()), list(our_sig.parameters.values())
    up_pos = [p for p in up_params if p.kind in positional]
    our_pos = [p for p in our_params if p.kind in positional]
    our_by_name = {p.name: p for p in our_params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    our_kinds = {p.kind for p in our_params}
    problems = []
    matched: dict[str, inspect.Parameter] = {}  # our parameter name -> upstream parameter it stands for
    for index, p in enumerate(up_pos):
        if index < len(our_pos):
            q = our_pos[index]
            if p.kind is P.POSITIONAL_OR_KEYWORD and (q.name != p.name or q.kind is not P.POSITIONAL_OR_KEYWORD):
                problems.append((p.name, f"position {index} is {q.name!r} ({q.kind.description}) here"))
            matched[q.name] = p
        elif P.VAR_POSITIONAL not in our_kinds:
            problems.append((p.name, "missing"))
        elif p.kind is P.POSITIONAL_OR_KEYWORD and p.name not in our_by_name and P.VAR_KEYWORD not in our_kinds:
            problems.append((p.name, "only accepted positionally here"))
    for p in up_params:
        if p.kind is P.KEYWORD_ONLY:
            if p.name in our_by_name:
                matched[p.name] = p
            elif P.VAR_KEYWORD not in our_kinds:
                problems.append((p.name, "missing"))
        elif p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and p.kind not in our_kinds:
            problems.append((p.name, f"no {p.kind.description} here"))
    for q in our_params:
        if q.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            continue
        p = matched.get(q.name)
        if q.default is P.empty and (p is None or p.default is not P.empty):
            problems.append((q.name, "required here, optional or absent upstream"))
        elif p is not None and p.default is not P.empty and isinstance(p.default, SIMPLE_VALUES) \
                and (type(q.default) is not type(p.default) or q.default != p.default):
            problems.append((q.name, f"default {q.default!r} here, {p.default!r} upstream"))
    return problems


# ---- the walk ----

def _member_kind(cls, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            break
    else:
        return "missing"
    for kind in (staticmethod, classmethod, property):
        if isinstance(raw, kind):
            return kind.__name__
    return "function" if inspect.isfunction(raw) else "attribute"


def _public_members(cls) -> dict[str, object]:
    """Public members upstream's classes define themselves (not those of object, ABC, TypedDict, ctypes)."""
    members = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] != "llama_cpp":
            continue
        members.update({n: v for n, v in vars(klass).items() if not n.startswith("_")})
    return members


@cache
def surface_report():
    """(problems, used exclusion keys, counts): problems are "key: what" strings for everything neither provided
    compatibly nor excluded."""
    problems, used = [], set()
    counts = dict(names=0, provided=0, excluded=0, members=0, signatures=0, constants=0)
    checked_homes = set()

    def excluded(*keys):
        for key in keys:
            reason = exclusion_reason(key)
            if reason is not None:
                used.update(k for k in EXCLUDED if k == key or ("*" in k and fnmatchcase(key, k)))
                return True
        return False

    def compare_callable(key, upstream, ours):
        counts["signatures"] += 1
        for parameter, what in signature_problems(upstream, ours):
            if not excluded(f"{key}({parameter})"):
                problems.append(f"{key}({parameter}): {what}")

    for public in upstream_surface.public_names():
        counts["names"] += 1
        home_key = f"{public.home}.{public.name}"
        our_module = _ours(public.module)
        ours = getattr(our_module, public.name, _MISSING) if our_module is not None else _MISSING
        if ours is _MISSING:
            if excluded(public.qualname, home_key, public.module, public.home):
                counts["excluded"] += 1
            else:
                problems.append(f"{public.qualname}: missing" + ("" if our_module else f" (no module {public.module})"))
            continue
        counts["provided"] += 1
        upstream_module = _import(public.module)
        upstream = getattr(upstream_module, public.name, _MISSING) if upstream_module is not None else _MISSING
        if upstream is _MISSING:
            continue
        if isinstance(upstream, SIMPLE_VALUES):
            counts["constants"] += 1
            if (type(ours) is not type(upstream) and not isinstance(upstream, enum.Enum)) or ours != upstream:
                if not excluded(public.qualname, home_key):
                    problems.append(f"{public.qualname}: {ours!r} here, {upstream!r} upstream")
            continue
        if home_key in checked_homes:
            continue
        checked_homes.add(home_key)
        if isinstance(upstream, type):
            if not isinstance(ours, type):
                problems.append(f"{home_key}: a class upstream, {type(ours).__name__} here")
                continue
            if _is_typeddict(upstream):
                missing = set(upstream.__annotations__) - set(getattr(ours, "__annotations__", {}))
                for field in sorted(missing):
                    if not excluded(f"{home_key}.{field}"):
                        problems.append(f"{home_key}.{field}: TypedDict field missing")
                continue
            compare_callable(f"{home_key}.__init__", upstream, ours)
            for member, _ in sorted(_public_members(upstream).items()):
                counts["members"] += 1
                member_key = f"{home_key}.{member}"
                up_kind, our_kind = _member_kind(upstream, member), _member_kind(ours, member)
                if our_kind == "missing" and not hasattr(ours, member):
                    if not excluded(member_key):
                        problems.append(f"{member_key}: missing")
                    continue
                if up_kind != our_kind and not (up_kind == "attribute" or our_kind == "attribute"):
                    if not excluded(member_key):
                        problems.append(f"{member_key}: a {up_kind} upstream, a {our_kind} here")
                    continue
                if callable(getattr(upstream, member)) and up_kind != "property":
                    compare_callable(member_key, getattr(upstream, member), getattr(ours, member))
        elif inspect.isroutine(upstream) or callable(upstream) and hasattr(upstream, "__signature__"):
            if not callable(ours):
                problems.append(f"{home_key}: callable upstream, {type(ours).__name__} here")
            else:
                compare_callable(home_key, upstream, ours)
    return problems, used, counts


def test_every_public_name_member_and_parameter_is_provided_or_excluded():
    problems, _, counts = surface_report()
    # the walk saw the whole surface (guards against a walk that silently finds nothing)
    assert counts["names"] > 1500 and counts["provided"] > 500 and counts["members"] > 50 \
        and counts["signatures"] > 100 and counts["constants"] > 300, counts
    assert not problems, f"{len(problems)} gaps (provide them or list them in llmplace/compat/surface.py):\n" + \
        "\n".join(problems)


def test_every_exclusion_is_still_needed():
    """An entry for something llmplace now provides (or upstream no longer has) is a stale claim."""
    _, used, _ = surface_report()
    assert sorted(set(EXCLUDED) - used) == []


def test_exclusion_reasons_say_why():
    short = {key: reason for key, reason in EXCLUDED.items() if len(reason) < 40}
    assert short == {}


# ---- the checker itself finds what differs ----

def test_signature_check_finds_renamed_missing_required_and_default_changes():
    def upstream(text, add_bos=True, *, special=False, **kwargs): ...

    def renamed(txt, add_bos=True, *, special=False, **kwargs): ...

    def no_keyword(text, add_bos=True): ...

    def more_required(text, extra, add_bos=True, *, special=False, **kwargs): ...

    def other_default(text, add_bos=False, *, special=False, **kwargs): ...

    def compatible(text, add_bos=True, special=False, verbose=None, **kwargs): ...

    assert [p for p, _ in signature_problems(upstream, renamed)] == ["text"]
    assert {p for p, _ in signature_problems(upstream, no_keyword)} == {"special", "kwargs"}
    assert ("extra", "required here, optional or absent upstream") in signature_problems(upstream, more_required)
    assert [p for p, _ in signature_problems(upstream, other_default)] == ["add_bos"]
    assert signature_problems(upstream, compatible) == []


# ---- what the issue reported, and the new names at work ----

def test_upstream_imports_work_after_install():
    """Third-party code's imports (issue 16), in a process where llama_cpp is llmplace's layer."""
    from isolation import outcome

    result = outcome("""
        import llmplace.compat
        llmplace.compat.install()
        from llama_cpp import (ChatCompletionRequestUserMessage, ChatCompletionRequestMessage, CreateCompletionResponse,
                               LlamaTokenizer, BaseLlamaTokenizer, LlamaDraftModel, BaseLlamaCache, set_verbose,
                               suppress_stdout_stderr, LogitsProcessor, LLAMA_TOKEN_TYPE_BYTE, LLAMA_SESSION_MAGIC)
        from llama_cpp.llama_tokenizer import LlamaHFTokenizer
        from llama_cpp.llama_cache import ChatCompletion
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        import llama_cpp
        assert "ChatCompletionRequestUserMessage" in llama_cpp.__all__
        message: ChatCompletionRequestUserMessage = {"role": "user", "content": "hi"}
        expect_typed(lambda: LlamaPromptLookupDecoding.find_candidate_pred_tokens([1], 2, "3"))
    """)
    assert result.kind == "typed" and result.error == "InvalidParameterError", result


def test_find_candidate_pred_tokens_equals_llama_cpp_pythons():
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding as Upstream

    from llmplace.compat.llama_speculative import LlamaPromptLookupDecoding as Ours

    rng = np.random.default_rng(16)
    for _ in range(400):
        ids = rng.integers(0, 4, size=int(rng.integers(0, 24))).astype(np.intc)
        ngram, n_pred = int(rng.integers(-1, 6)), int(rng.integers(-2, 9))
        want = Upstream.find_candidate_pred_tokens(ids, ngram, n_pred)
        got = Ours.find_candidate_pred_tokens(ids, ngram, n_pred)
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), (ids, ngram, n_pred)
        assert Ours(ngram, n_pred)(ids).tolist() == want.tolist()
    # the first earlier occurrence wins, continuations are cut at the end
    assert Ours.find_candidate_pred_tokens(np.array([5, 1, 2, 5, 3, 5]), 1, 3).tolist() == [1, 2, 5]
    assert Ours.find_candidate_pred_tokens(np.array([7, 8, 7]), 2, 10).tolist() == [8, 7]


BAD_LOOKUPS = ["None, 2, 3", "[[1, 2], [1, 2]], 2, 3", "['a', 'b'], 2, 3", "[1.5, 2.5], 2, 3", "[1, 2], 2.0, 3",
               "[1, 2], 2, None", "[1, 2], True, 3", "object(), 2, 3"]
BAD_TOKEN_LISTS = ["None", "5", "[None]", "[1.5]", "['x']", "[-1]", "[10**20]", "[2**31]", "[32000]", "[True]",
                   "np.array([[1, 2]])", "np.array([1.0])", "[np.int64(2**40)]", "'abc'", "[object()]"]


def test_bad_inputs_get_typed_errors(model_cache):
    """Each bad argument of find_candidate_pred_tokens and of detokenize / LlamaTokenizer on Llama 2's SPM
    vocabulary raises a typed error, in one subprocess (a crash of any case would show as the batch's)."""
    import json

    import models
    from isolation import outcome

    spm = models.llama_cpp_vocab_paths(model_cache, ("llama-spm",))["llama-spm"]
    cases = [f"lambda: LlamaPromptLookupDecoding.find_candidate_pred_tokens({a})" for a in BAD_LOOKUPS]
    cases += [f"lambda: llm.detokenize({t})" for t in BAD_TOKEN_LISTS]
    cases += [f"lambda: tokenizer.detokenize({t})" for t in BAD_TOKEN_LISTS]
    cases += ["lambda: LlamaTokenizer(object())", "lambda: LlamaTokenizer(None)"]
    result = outcome(f"""
        import numpy as np
        from llmplace.compat import Llama
        from llmplace.compat.llama_speculative import LlamaPromptLookupDecoding
        from llmplace.compat.llama_tokenizer import LlamaTokenizer
        llm = Llama({str(spm)!r}, vocab_only=True, verbose=False)
        tokenizer = LlamaTokenizer(llm)
        kinds = []
        for case in [{", ".join(cases)}]:
            try:
                case()
                kinds.append("ok")
            except LlmplaceError as exc:
                kinds.append("typed")
            except BaseException as exc:
                kinds.append("untyped " + type(exc).__name__ + ": " + str(exc)[:80])
        report("ok", message=json.dumps(kinds))
    """, timeout=120)
    assert result.kind == "ok", result
    kinds = json.loads(result.message)
    assert len(kinds) == len(cases)
    assert [(case, kind) for case, kind in zip(cases, kinds) if kind != "typed"] == []


def test_suppress_stdout_stderr_silences_python_and_native_writes():
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import logging, os, sys
        from llmplace.compat import suppress_stdout_stderr, set_verbose
        with suppress_stdout_stderr(disable=False):
            print("hidden print"); os.write(1, b"hidden fd 1\\n"); os.write(2, b"hidden fd 2\\n")
            sys.stderr.write("hidden stderr\\n")
        with suppress_stdout_stderr():  # upstream's default: disabled, a no-op
            print("shown by default")
        print("shown after", flush=True); os.write(2, b"stderr after\\n")
        set_verbose(True)
        assert logging.getLogger("llmplace").level == logging.DEBUG
        set_verbose(False)
        assert logging.getLogger("llmplace").level == logging.ERROR
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=tempfile.gettempdir())  # the checkout's llmplace/ would hide the installed one
    assert done.returncode == 0, done.stderr
    assert done.stdout == "shown by default\nshown after\n"
    assert done.stderr == "stderr after\n"
