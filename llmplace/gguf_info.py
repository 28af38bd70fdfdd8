"""Read a GGUF file's metadata and tensor table without loading weights (with the `gguf` package)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .gguf_validate import validate

_LAYER = re.compile(r"^blk\.(\d+)\.")
GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24          # magic, version (u32), tensor count (u64), key/value count (u64)
SUPPORTED_GGUF_VERSIONS = (2, 3)


def check_header(path: Path) -> None:
    """Reject what is certainly not a loadable GGUF before llama.cpp opens it, with a message that says why."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}; check the path (relative paths are resolved "
                             f"from {Path.cwd()})")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the path of a .gguf file inside it")
    size = path.stat().st_size
    if size < GGUF_HEADER_BYTES:
        raise ModelLoadError(f"{path} is {size} bytes long, too short to be a GGUF model (a GGUF file "
                             f"starts with a {GGUF_HEADER_BYTES}-byte header); the file is empty or truncated")
    with open(path, "rb") as f:
        header = f.read(8)
    if header[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {header[:4]!r}, not b'GGUF'); "
                             "llmplace loads GGUF models only: convert others with llama.cpp's convert_hf_to_gguf.py")
    version = int.from_bytes(header[4:8], "little")
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelLoadError(f"{path} has GGUF version {version}; this llama.cpp reads versions "
                             f"{SUPPORTED_GGUF_VERSIONS}. Re-convert the model with a current llama.cpp")
    # The header, key/values and tensor table, bounds-checked before llama.cpp trusts them (cached per file).
    validate(path)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # GGUF order: ne0 (the contiguous dimension) first
    dtype: str                  # ggml type name: "F32", "Q4_0", "Q4_K" ...
    n_bytes: int
    offset: int                 # byte offset of the data in the file
    layer: int | None           # N of "blk.N." names, None for others (embeddings, output ...)


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def read(path: str | os.PathLike) -> GGUFInfo:
    """Parse the header, key/values and tensor table of a GGUF file (tensor data is not read).

    Parsing a large vocabulary takes seconds, and explain, load and placement_report all need the table:
    results are cached per file, keyed by its size and modification time. Treat them as read-only."""
    path = Path(path)
    check_header(path)
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read(path: str, size: int, mtime_ns: int) -> GGUFInfo:  # noqa: ARG001 - size and mtime key the cache
    from gguf import GGUFReader  # imported here: it is slow to import and only needed for inspection

    try:
        reader = GGUFReader(os.fspath(path), "r")
    except (ValueError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own bookkeeping (version, counts), not key/values
        try:
            metadata[name] = field.contents()
        except Exception:  # noqa: BLE001 - an unreadable value is shown as such, not fatal for inspection
            metadata[name] = "<unreadable>"
    tensors = []
    for t in reader.tensors:
        m = _LAYER.match(t.name)
        tensors.append(TensorInfo(name=t.name, shape=tuple(int(x) for x in t.shape), dtype=t.tensor_type.name,
                                  n_bytes=int(t.n_bytes), offset=int(t.data_offset),
                                  layer=int(m.group(1)) if m else None))
    return GGUFInfo(path=Path(path), metadata=metadata, tensors=tensors)
