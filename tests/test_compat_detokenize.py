"""Differential test of compat Llama.detokenize (and tokenize) against llama-cpp-python 0.3.36 on one vocabulary
of each tokenizer family llama.cpp has (SPM, BPE, WPM, UGM): llama.cpp's own models/ggml-vocab-*.gguf files of
the pinned source, loaded vocab_only by both libraries.

The SmolLM2 differential tests (tests/test_compat.py) only see a BPE vocabulary, so they missed that
llama-cpp-python drops the leading space of the text when the first token is BOS (issue 16): SPM vocabularies
render "Hello" after BOS as " Hello".

Tokens whose piece is longer than 32 bytes are left out of the comparison: llama-cpp-python reads every piece into
a 32-byte buffer and, for a longer one, appends the start of that buffer (bytes of earlier pieces) instead of the
piece (its _internals.LlamaModel.detokenize slices the buffer with llama_token_to_piece's negative return
value); llmplace returns the piece.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("llama_cpp", reason="the differential tests need llama-cpp-python 0.3.36")

import models  # noqa: E402  (tests/models.py)
from reference import reference_llama  # noqa: E402  (tests/reference.py)

from llmplace import compat  # noqa: E402

# (file name in llama.cpp's models/, llama.cpp's vocabulary type): two SPM vocabularies (Llama 2, Phi-3),
# two BPE (Llama 3, Qwen 2), WPM (BERT) and UGM (nomic-bert-moe's T5-style unigram).
VOCABS = {"llama-spm": 1, "phi-3": 1, "llama-bpe": 2, "qwen2": 2, "bert-bge": 3, "nomic-bert-moe": 4}
TEXTS = [b"Hello World", b" Hello World", b"  two spaces", b"\n\nline\tbreaks", "🦙 llama ü".encode(),
         b"<s> not parsed </s>"]
UPSTREAM_PIECE_BUFFER = 32  # llama-cpp-python's fixed piece buffer (see the module docstring)


@pytest.fixture(scope="module")
def vocab_paths(model_cache):
    return models.llama_cpp_vocab_paths(model_cache, tuple(VOCABS))


@pytest.fixture(scope="module", params=list(VOCABS))
def pair(request, vocab_paths):
    path = str(vocab_paths[request.param])
    upstream = reference_llama(path, vocab_only=True, verbose=False)
    ours = compat.Llama(path, vocab_only=True, verbose=False)
    yield request.param, upstream, ours
    ours.close()
    upstream.close()


def _token_lists(upstream, ours) -> list[list[int]]:
    """Tokenized texts with and without BOS, BOS before text that starts with a space, special tokens alone and
    in the middle, byte-fallback tokens (also a lone first byte of a multi-byte character), and random ids."""
    bos, eos = upstream.token_bos(), upstream.token_eos()
    lists: list[list[int]] = [[]]
    for text in TEXTS:
        plain = upstream.tokenize(text, add_bos=False)
        lists += [upstream.tokenize(text, add_bos=True), plain, plain[:1], plain[1:]]
        if bos >= 0:
            lists += [[bos, *plain], [bos, bos, *plain], [*plain[:2], bos, *plain[2:]]]
    specials = [t for t in (bos, eos) if t >= 0]
    lists += [specials, specials[::-1], [specials[0]]]
    vocab = ours.llmplace_model.vocab
    fits = [t for t in range(vocab.n_tokens) if len(vocab.piece(t, special=True)) <= UPSTREAM_PIECE_BUFFER]
    rng = random.Random(16)
    lists += [rng.sample(fits, 6) for _ in range(15)]
    if bos >= 0:
        lists += [[bos, *rng.sample(fits, 4)] for _ in range(15)]
    return [t for t in lists if all(len(vocab.piece(x, special=True)) <= UPSTREAM_PIECE_BUFFER for x in t)]


def test_vocabulary_type_is_the_family_named(pair):
    name, upstream, _ = pair
    assert upstream._model.vocab_type() == VOCABS[name]


def test_tokenize_and_detokenize_equal_llama_cpp_python(pair):
    name, upstream, ours = pair
    for text in TEXTS:
        for add_bos in (True, False):
            for special in (True, False):
                assert ours.tokenize(text, add_bos, special) == upstream.tokenize(text, add_bos, special), \
                    (name, text, add_bos, special)
    lists = _token_lists(upstream, ours)
    assert len(lists) > 40
    for tokens in lists:
        for special in (False, True):
            assert ours.detokenize(tokens, special=special) == upstream.detokenize(tokens, special=special), \
                (name, tokens, special)


def test_spm_text_after_bos_has_no_leading_space(vocab_paths):
    """The case of issue 16: Llama 2's vocabulary, [BOS, Hello, World]."""
    with compat.Llama(str(vocab_paths["llama-spm"]), vocab_only=True, verbose=False) as llm:
        tokens = llm.tokenize(b"Hello World")
        assert tokens[0] == llm.token_bos() and len(tokens) == 3
        assert llm.detokenize(tokens) == b"Hello World"
        assert llm.detokenize(tokens[1:]) == b" Hello World"  # without BOS the prefixed space stays
        # numpy token ids (what generate() hands around) are the same tokens
        import numpy as np

        assert llm.detokenize(np.array(tokens, dtype=np.intc)) == b"Hello World"


def test_llama_tokenizer_equals_llama_cpp_pythons(pair):
    """llama_tokenizer.LlamaTokenizer (what upstream's Llama uses inside) gives the same tokens and bytes, and a
    Llama given its own LlamaTokenizer as tokenizer= does not recurse."""
    from llama_cpp.llama_tokenizer import LlamaTokenizer as UpstreamTokenizer

    from llmplace.compat.llama_tokenizer import LlamaTokenizer

    name, upstream, ours = pair
    theirs, mine = UpstreamTokenizer(upstream), LlamaTokenizer(ours)
    for text in TEXTS:
        assert mine.tokenize(text) == theirs.tokenize(text), (name, text)
        assert mine.encode(text.decode()) == theirs.encode(text.decode())
        tokens = theirs.tokenize(text)
        assert mine.detokenize(tokens) == theirs.detokenize(tokens)
        assert mine.decode(tokens) == theirs.decode(tokens)
    ours.tokenizer_ = mine
    try:
        assert ours.detokenize(theirs.tokenize(TEXTS[0])) == upstream.detokenize(theirs.tokenize(TEXTS[0]))
    finally:
        ours.tokenizer_ = None
