"""Coverage-guided fuzzing of llmplace's GGUF validation and llama.cpp's loader (not run in CI).

    pip install atheris
    python tools/fuzz_gguf_atheris.py SEED.gguf [atheris/libFuzzer options, e.g. -max_total_time=3600]

SEED.gguf should be small (tests/test_gguf_fuzz.py writes a 35 KB one). Each input is written to a file and
validated; inputs the validator accepts are loaded by llama.cpp (vocab only, then fully, with one generated
token). A ModelLoadError is a pass; any other exception, or the process dying, is a finding: make
llmplace/gguf_validate.py refuse that input and add it to tests/test_gguf_fuzz.py.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

import llmplace
from llmplace import LlmplaceError, ModelLoadError, gguf_validate

_PATH = os.path.join(tempfile.mkdtemp(prefix="llmplace-fuzz-"), "input.gguf")


def test_one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    gguf_validate._validate.cache_clear()  # same path each time: no stale cached verdict
    try:
        gguf_validate.validate(_PATH)
        llmplace.load(_PATH, vocab_only=True, progress=False).close()
        with llmplace.load(_PATH, progress=False) as model:
            try:
                llmplace.generate(model, "a", max_tokens=1, temperature=0)
            except LlmplaceError:
                pass
    except ModelLoadError:
        pass


def main() -> None:
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        sys.exit(__doc__)
    seed_dir = tempfile.mkdtemp(prefix="llmplace-fuzz-corpus-")
    with open(sys.argv[1], "rb") as src, open(os.path.join(seed_dir, "seed.gguf"), "wb") as dst:
        dst.write(src.read())
    # instrument_all, not instrument_imports: an editable install imports llmplace through a custom loader,
    # which instrument_imports does not see (no coverage feedback at all).
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], seed_dir, *sys.argv[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
