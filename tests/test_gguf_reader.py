"""llmplace reads GGUF files with one parser (gguf_validate's bounds-checked pass): it gives what the `gguf`
package's reader gives, and each file is parsed once however many parts of llmplace ask."""

from __future__ import annotations

import os
import shutil

import pytest

from llmplace import gguf_info, gguf_validate


def reference(path):
    """Metadata and tensor table as the `gguf` package reads them (the reader llmplace used before)."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    metadata = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            metadata[name] = field.contents()
    tensors = [(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.n_bytes), int(t.data_offset))
               for t in reader.tensors]
    return metadata, tensors


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path", "tiny_qwen3moe_path"])
def test_metadata_and_tensors_are_what_the_gguf_package_reads(fixture, request):
    path = request.getfixturevalue(fixture)
    metadata, tensors = reference(path)
    info = gguf_info.read(path)
    assert list(info.metadata) == list(metadata)
    for key, value in metadata.items():
        assert info.metadata[key] == value, key
        assert type(info.metadata[key]) is type(value), key      # bool stays bool, a str a str
        if isinstance(value, list) and value:
            assert type(info.metadata[key][0]) is type(value[0]), key
    assert [(t.name, t.shape, t.dtype, t.n_bytes, t.offset) for t in info.tensors] == tensors
    assert all(t.layer == (int(t.name.split(".")[1]) if t.name.startswith("blk.") else None) for t in info.tensors)


def test_a_file_is_parsed_once_for_validation_metadata_and_tensors(tiny_llama_path, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_llama_path, path)
    before = gguf_validate._validate.cache_info()
    gguf_info.check_header(path)          # what every load does first
    info = gguf_info.read(path)           # what load with overrides, explain, fit and placement_report read
    gguf_info.read(path)
    assert gguf_validate.validate(path).n_tensors == len(info.tensors)
    after = gguf_validate._validate.cache_info()
    assert after.misses - before.misses == 1


def test_a_changed_file_is_read_again(tiny_llama_path, tiny_qwen3moe_path, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_llama_path, path)
    assert gguf_info.read(path).arch == "llama"
    shutil.copyfile(tiny_qwen3moe_path, path)
    stat = path.stat()  # a later modification time even where the clock is coarse: the cache key changes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_info.read(path).arch == "qwen3moe"
