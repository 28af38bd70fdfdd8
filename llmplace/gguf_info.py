"""Read a GGUF file's metadata and tensor table without loading weights (with the `gguf` package)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"^blk\.(\d+)\.")


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
    """Parse the header, key/values and tensor table of a GGUF file (tensor data is not read)."""
    from gguf import GGUFReader  # imported here: it is slow to import and only needed for inspection

    reader = GGUFReader(os.fspath(path), "r")
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
