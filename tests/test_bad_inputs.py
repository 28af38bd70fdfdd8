"""Bad inputs raise typed exceptions whose messages say what to fix, and the interpreter survives.

Each test ends by using the library again in the same process (`still_works`)."""

from __future__ import annotations

import shutil

import pytest

import llmplace
from llmplace import (ClosedError, ContextOverflowError, InvalidParameterError, ModelLoadError, TokenizationError)


@pytest.fixture
def still_works(smollm2):
    yield
    assert llmplace.generate(smollm2, "Hi", max_tokens=2, temperature=0).tokens


def test_missing_path(tmp_path, still_works):
    with pytest.raises(ModelLoadError, match="not found") as info:
        llmplace.load(tmp_path / "nope.gguf")
    assert isinstance(info.value, OSError)


def test_directory_instead_of_file(tmp_path, still_works):
    with pytest.raises(ModelLoadError, match="is a directory"):
        llmplace.load(tmp_path)


def test_empty_file(tmp_path, still_works):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="too short"):
        llmplace.load(path)


def test_not_a_gguf_file(tmp_path, still_works):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        llmplace.load(path)


def test_unsupported_gguf_version(tmp_path, still_works):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="version 99"):
        llmplace.load(path)


def test_truncated_gguf_with_intact_header(tmp_path, tiny_llama_path, still_works):
    data = tiny_llama_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match="beyond the end of the file.*re-download"):
        llmplace.load(path, progress=False)


def test_tensor_data_offset_past_end_of_file(tmp_path, tiny_llama_path, still_works):
    from gguf import GGUFReader

    path = tmp_path / "bad_offset.gguf"
    shutil.copy(tiny_llama_path, path)
    reader = GGUFReader(path, "r+")
    offset_part = reader.tensors[-1].field.parts[-1]   # the tensor's data offset (uint64), memory-mapped
    offset_part[0] = path.stat().st_size * 4
    reader.data.flush()
    del reader
    with pytest.raises(ModelLoadError, match="beyond the end of the file"):
        llmplace.load(path, progress=False)


def test_invalid_utf8_bytes_in_prompt(smollm2, still_works):
    with pytest.raises(TokenizationError, match="not valid UTF-8"):
        llmplace.generate(smollm2, b"caf\xe9 au lait", max_tokens=2)
    with pytest.raises(TokenizationError, match="surrogate"):
        smollm2.tokenize("bad \udcff surrogate")


def test_prompt_longer_than_context(smollm2, still_works):
    with llmplace.Context(smollm2, n_ctx=64) as ctx:
        with pytest.raises(ContextOverflowError, match="larger n_ctx"):
            llmplace.generate(smollm2, "word " * (ctx.n_ctx + 10), max_tokens=4, context=ctx)
        with pytest.raises(ContextOverflowError, match="larger n_ctx"):
            ctx.decode(smollm2.tokenize("word " * (ctx.n_ctx + 10)))
        # The context stays usable after the refusal.
        assert llmplace.generate(smollm2, "Hello", max_tokens=2, temperature=0, context=ctx).tokens


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(n_ctx=-1), "n_ctx"),
    (dict(n_ctx=1 << 40), "n_ctx"),
    (dict(n_batch=0), "n_batch"),
    (dict(n_batch=-5), "n_batch"),
    (dict(n_ubatch=0), "n_ubatch"),
    (dict(n_threads=0), "n_threads"),
    (dict(n_ctx="4096"), "n_ctx"),
    (dict(type_k="q3_weird"), "type_k"),
    (dict(flash_attn="yes"), "flash_attn"),
    (dict(type_v="q8_0", flash_attn=False), "needs flash attention"),
])
def test_bad_context_parameters(smollm2, kwargs, fragment, still_works):
    with pytest.raises(InvalidParameterError, match=fragment):
        llmplace.Context(smollm2, **kwargs)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(top_p=2.0), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(min_p=1.5), "min_p"),
    (dict(top_k=-3), "top_k"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(seed=-1), "seed"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"),
    (dict(logit_bias={10**9: 1.0}), "outside the vocabulary"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(mirostat=3), "mirostat must be 0"),
    (dict(mirostat=2, mirostat_eta=2.0), "mirostat_eta"),
    (dict(mirostat=1, mirostat_tau=float("inf")), "mirostat_tau"),
])
def test_bad_sampling_values(smollm2, kwargs, fragment, still_works):
    with pytest.raises(InvalidParameterError, match=fragment):
        llmplace.generate(smollm2, "Hi", **kwargs)


def test_bad_prompt_tokens(smollm2, still_works):
    with pytest.raises(InvalidParameterError, match="not a token id"):
        llmplace.generate(smollm2, [1, 2, 10**9], max_tokens=2)
    with pytest.raises(InvalidParameterError, match="empty"):
        llmplace.generate(smollm2, [], max_tokens=2)


def test_use_after_close(smollm2_path, still_works):
    model = llmplace.load(smollm2_path, progress=False)
    ctx = llmplace.Context(model, n_ctx=128)
    model.close()
    assert model.closed and ctx.closed   # closing a model closes its contexts first
    with pytest.raises(ClosedError, match="closed"):
        model.tokenize("hello")
    with pytest.raises(ClosedError, match="closed"):
        _ = model.n_layer
    with pytest.raises(ClosedError, match="closed"):
        ctx.decode([1, 2, 3])
    with pytest.raises(ClosedError, match="closed"):
        llmplace.generate(model, "Hi", max_tokens=2)
    with pytest.raises(ClosedError):
        llmplace.Context(model)
    model.close()  # twice is fine


def _first_equal_length_tokens(field) -> tuple[int, int]:
    strings = [field.parts[i] for i in field.data]
    by_length: dict[int, int] = {}
    for i, s in enumerate(strings[:1000]):
        if len(s) > 3 and len(s) in by_length:
            return by_length[len(s)], i
        by_length.setdefault(len(s), i)
    raise AssertionError("no two tokens of the same length")


def _repeat_a_token(reader) -> None:
    field = reader.fields["tokenizer.ggml.tokens"]
    a, b = _first_equal_length_tokens(field)
    field.parts[field.data[b]][:] = field.parts[field.data[a]]


# Each damages one field of a copy of a valid model; the validator names it before llama.cpp parses the file.
# The first two would abort the process inside llama.cpp (GGML_ASSERT) without the check.
@pytest.mark.parametrize("damage,fragment", [
    (lambda r: r.fields["llama.block_count"].parts[-1].__setitem__(0, 0), "block_count' is 0"),
    (lambda r: r.fields["llama.attention.layer_norm_rms_epsilon"].parts[-1].__setitem__(0, -1.0), "epsilon"),
    (_repeat_a_token, "twice"),
    (lambda r: r.fields["GGUF.tensor_count"].parts[0].__setitem__(0, 2**40), "claims 1099511627776 tensors"),
    (lambda r: r.fields["GGUF.kv_count"].parts[0].__setitem__(0, 2**62), "key/values"),
    (lambda r: r.fields["general.architecture"].parts[2].__setitem__(0, 77), "unknown value type 77"),
    (lambda r: r.tensors[1].field.parts[2].__setitem__(0, 5), "5 dimensions"),
    (lambda r: r.tensors[1].field.parts[3].__setitem__(0, 0), "dimension 0 of tensor"),
    (lambda r: r.tensors[1].field.parts[4].__setitem__(0, 4), "ggml type 4"),
    (lambda r: r.tensors[1].field.parts[-1].__setitem__(0, r.tensors[1].field.parts[-1][0] + 1), "alignment"),
    (lambda r: r.tensors[1].field.parts[-1].__setitem__(0, r.tensors[0].field.parts[-1][0]), "overlaps"),
])
def test_malformed_gguf_is_refused_before_llama_cpp_parses_it(tmp_path, tiny_llama_path, damage, fragment,
                                                              still_works):
    from gguf import GGUFReader

    path = tmp_path / "damaged.gguf"
    shutil.copy(tiny_llama_path, path)
    reader = GGUFReader(path, "r+")
    damage(reader)
    reader.data.flush()
    del reader
    with pytest.raises(ModelLoadError, match=fragment) as info:
        llmplace.load(path, progress=False)
    assert "at byte" in str(info.value) and "re-download or re-convert" in str(info.value)
