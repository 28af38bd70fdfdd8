"""Llama.from_pretrained: find one GGUF in a Hugging Face Hub repository by glob and download it (with
huggingface_hub's cache), as llama-cpp-python does."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import PurePosixPath


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("Llama.from_pretrained requires the huggingface-hub package. "
                          "You can install it with `pip install huggingface-hub`.") from None
    return huggingface_hub


def _match(repo_id: str, names: list[str], pattern: str) -> str:
    matches = [name for name in names if fnmatch.fnmatch(name, pattern)]
    if not matches:
        raise ValueError(f"No file found in {repo_id} that match {pattern}\n\nAvailable Files:\n{json.dumps(names)}")
    if len(matches) > 1:
        raise ValueError(f"Multiple files found in {repo_id} matching {pattern}\n\n"
                         f"Available Files:\n{json.dumps(names)}")
    return matches[0]


def download(repo_id: str, filename: str, additional_files=None, local_dir=None, cache_dir=None) -> str:
    """The local path of the file of `repo_id` matching the glob `filename` (downloaded if needed); files
    matching the globs in `additional_files` (other shards, for instance) are downloaded next to it."""
    hub = _hub()
    hub.utils.validate_repo_id(repo_id)
    names = []
    for entry in hub.HfFileSystem().ls(repo_id, recursive=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        names.append(str(PurePosixPath(name).relative_to(repo_id)))

    def fetch(pattern: str, **extra) -> str:
        path = PurePosixPath(_match(repo_id, names, pattern))
        subfolder = None if str(path.parent) == "." else str(path.parent)
        return hub.hf_hub_download(repo_id=repo_id, filename=path.name, subfolder=subfolder, local_dir=local_dir,
                                   cache_dir=cache_dir, **extra)

    model_path = fetch(filename)
    for pattern in additional_files or ():
        fetch(pattern)
    return os.fspath(model_path)
