"""Obtain the pinned llama.cpp source into vendor/llama.cpp/ (run by CMake at configure time, or by hand).

The source is the upstream tree carried by one source distribution on the package index, named by
package and sha256 in vendor/llama.cpp.pin. pip downloads it (so proxies, mirrors and credentials work
as for any install), the archive is cached by hash outside the throw-away build folder, and only the
vendor/llama.cpp subtree is extracted. A stamp file makes a second call a no-op, so a rebuild never
downloads or extracts again.

Usage: python tools/vendor_llama_cpp.py [--print-commit]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = ROOT / "vendor" / "llama.cpp.pin"
DEST = ROOT / "vendor" / "llama.cpp"
STAMP = DEST / ".llmplace-pin"
# Folders of the upstream tree the build never reads; dropping them keeps the tree small.
SKIPPED_TOP_LEVEL = {".git", ".github", ".devops", "docs", "media", "models", "app", "pocs", ".pi", ".gemini"}


def read_pin() -> tuple[str, str, str]:
    """Return (requirement line, sha256, llama.cpp commit) from the pin file."""
    requirement = sha256 = commit = ""
    for line in PIN.read_text().splitlines():
        line = line.strip()
        if line.startswith("# commit "):
            commit = line.split()[-1]
        elif line and not line.startswith("#"):
            requirement = line
            sha256 = line.split("--hash=sha256:")[1].split()[0]
    if not (requirement and sha256 and commit):
        raise SystemExit(f"{PIN}: expected a requirement line with --hash=sha256:... and a '# commit <sha>' line")
    return requirement, sha256, commit


def cache_dir() -> Path:
    base = os.environ.get("LLMPLACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmplace")
    return Path(base) / "sdist"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(requirement: str, sha256: str) -> Path:
    cached = cache_dir() / f"{sha256}.tar.gz"
    if cached.exists() and file_sha256(cached) == sha256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    package = requirement.split("==")[0]
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "pin.txt"
        req_file.write_text(requirement + "\n")
        print(f"llmplace: downloading the pinned llama.cpp source ({package}) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", package,
             "--require-hashes", "-r", str(req_file), "-d", tmp, "--quiet"],
            check=True)
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith(".tar.gz")]
        if len(archives) != 1 or file_sha256(archives[0]) != sha256:
            raise SystemExit("llmplace: the downloaded source archive does not match the pinned sha256")
        shutil.move(str(archives[0]), cached)
    return cached


def extract(archive: Path, sha256: str) -> None:
    staging = DEST.with_name("llama.cpp.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <sdist-root>/vendor/llama.cpp/<top>/...
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or parts[3] in SKIPPED_TOP_LEVEL:
                continue
            member.name = "/".join(parts[3:])
            tar.extract(member, staging, filter="data")
    (staging / STAMP.name).write_text(sha256 + "\n")
    shutil.rmtree(DEST, ignore_errors=True)
    staging.rename(DEST)


def main() -> None:
    requirement, sha256, commit = read_pin()
    if "--print-commit" in sys.argv:
        print(commit)
        return
    if STAMP.exists() and STAMP.read_text().strip() == sha256:
        return
    extract(fetch_archive(requirement, sha256), sha256)
    print(f"llmplace: llama.cpp {commit[:10]} extracted to {DEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
