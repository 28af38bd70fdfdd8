"""The one token loop (llmplace/token_loop.py) and the one text assembler (llmplace/text_assembly.py): every
generation path goes through them, and they agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import llmplace
from llmplace.text_assembly import TextAssembler
from llmplace.token_loop import SequenceState

PACKAGE = Path(llmplace.__file__).parent


def test_text_is_assembled_in_one_place():
    """UTF-8 across tokens and stop strings are handled by text_assembly.py alone: no other module of the
    library builds an incremental decoder or matches stop strings."""
    others = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "text_assembly.py":
            continue
        source = path.read_text(encoding="utf-8")
        if re.search(r"getincrementaldecoder|class \w*StopMatcher", source):
            others.append(str(path.relative_to(PACKAGE)))
    assert others == []


def _split_character_tokens(model) -> list[int]:
    """Tokens whose pieces are parts of one multi-byte character (byte tokens of a byte-level vocabulary)."""
    data = "é€".encode("utf-8")
    pieces = {}
    for token in range(model.n_vocab):
        piece = model.vocab.piece(token)
        if len(piece) == 1 and piece in {bytes([b]) for b in data}:
            pieces.setdefault(piece, token)
        if len(pieces) == len(set(data)):
            break
    return [pieces[bytes([b])] for b in data]


def test_assembler_joins_split_characters_and_holds_back_stop_strings(smollm2):
    tokens = _split_character_tokens(smollm2)
    assembler = TextAssembler(smollm2.vocab)
    texts = [assembler.add(t, at_limit=False) for t in tokens]
    assert "".join(text for text, _ in texts) == "é€"
    assert all(finish is None for _, finish in texts)
    assert texts[0][0] == ""  # the first byte of 'é' alone is not emitted

    hello = smollm2.tokenize("Hello world, stop here", add_special=False)
    assembler = TextAssembler(smollm2.vocab, stops=["stop"])
    out, finish = [], None
    for token in hello:
        text, finish = assembler.add(token, at_limit=False)
        out.append(text)
        if finish:
            break
    assert "".join(out) == "Hello world, " and finish == "stop"

    # at the limit, what is held back is released (no stop string completed) and the finish is "length"
    assembler = TextAssembler(smollm2.vocab, stops=["stop sign"])
    text = "".join(assembler.add(t, at_limit=False)[0] for t in hello[:-1])
    last, finish = assembler.add(hello[-1], at_limit=True)
    assert text + last == "Hello world, stop here" and finish == "length"


def test_sequence_state_limits(smollm2):
    token = smollm2.tokenize("a", add_special=False)[0]
    state = SequenceState(TextAssembler(smollm2.vocab), n_prompt=5, max_tokens=3, n_ctx=100)
    assert [state.emit(token)[1] for _ in range(3)] == [None, None, "length"]
    # the context: prompt 5 + generated tokens before this one must leave room to decode it
    state = SequenceState(TextAssembler(smollm2.vocab), n_prompt=5, max_tokens=100, n_ctx=8)
    assert [state.emit(token)[1] for _ in range(4)] == [None, None, None, "length"]


def test_every_path_gives_the_same_greedy_text(smollm2):
    """Plain generation, a stream, speculative decoding (prompt lookup), a Chat-free drop-in completion and the
    drop-in's hooked loop (an identity logits processor) run the same loop: greedy text is identical."""
    prompt = "The capital of France is Paris. The capital of Germany is"
    plain = llmplace.generate(smollm2, prompt, max_tokens=24, temperature=0)
    streamed = "".join(step.text for step in llmplace.stream_generate(smollm2, prompt, max_tokens=24, temperature=0))
    lookup = llmplace.generate(smollm2, prompt, max_tokens=24, temperature=0, lookup=True)
    assert streamed == plain.text == lookup.text
    assert lookup.tokens == plain.tokens

    llama = llmplace.Llama(model_path=str(smollm2.path), n_ctx=256, verbose=False)
    try:
        tokens = smollm2.tokenize(prompt)
        direct = llama.create_completion(tokens, max_tokens=24, temperature=0)["choices"][0]["text"]
        hooked = llama.create_completion(tokens, max_tokens=24, temperature=0,
                                         logits_processor=lambda ids, scores: np.asarray(scores))
        assert direct == hooked["choices"][0]["text"] == plain.text
    finally:
        llama.close()
