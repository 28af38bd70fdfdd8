"""Read a GGUF file's metadata and tensor table without loading weights.

The reading is gguf_validate's: one bounds-checked pass over the header, key/values and tensor table gives the
checks, the metadata and the table, cached per file. This module adds the early checks with the plainest
messages (`check_header`) and the view the rest of llmplace inspects (`read`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gguf_validate
from .errors import ModelLoadError
from .gguf_validate import TensorInfo

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
    gguf_validate.validate(path)


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
    """The header, key/values and tensor table of a GGUF file (tensor data is not read).

    Parsing a large vocabulary takes a while, and explain, load and placement_report all need the table:
    the pass that validates the file reads them, once per file (cached, keyed by its size and modification
    time). Treat the result as read-only."""
    path = Path(path)
    check_header(path)
    contents = gguf_validate.read(path)
    return GGUFInfo(path=path.resolve(), metadata=contents.metadata, tensors=contents.tensors)
