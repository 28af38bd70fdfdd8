from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402  (tests/models.py)

import llmplace  # noqa: E402


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    with llmplace.load(smollm2_path, progress=False) as model:
        yield model


@pytest.fixture(scope="session")
def gemma3_path(model_cache) -> Path:
    return models.gemma3_path(model_cache)


@pytest.fixture(scope="session")
def tiny_llama_path(model_cache) -> Path:
    return models.synthetic_path(model_cache, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen3moe_path(model_cache) -> Path:
    return models.synthetic_path(model_cache, "tiny-qwen3moe")
