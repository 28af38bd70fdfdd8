"""llmplace's cache folder: $LLMPLACE_CACHE, else $XDG_CACHE_HOME/llmplace, else ~/.cache/llmplace.

The build uses the same root for the pinned llama.cpp source (tools/vendor_llama_cpp.py, which runs before the
package exists and so repeats these three lines); the library keeps the demo model (models/) and the measured
runtime rows (runtime.json) there."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("LLMPLACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmplace")
    return Path(base)
