"""Vocabulary: text ↔ tokens, token pieces, special tokens."""

from __future__ import annotations

import numbers
from typing import Sequence

from ._ffi import C, ffi
from .errors import TokenizationError


def encode_utf8(text: str | bytes, what: str = "text") -> bytes:
    """UTF-8 bytes of `text`; invalid input raises TokenizationError saying where and how to fix it."""
    if isinstance(text, bytes):
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TokenizationError(
                f"{what} is not valid UTF-8 (byte {exc.start}: {text[exc.start:exc.start + 4]!r}); "
                "decode it yourself, e.g. data.decode('utf-8', errors='replace'), and pass a str") from None
        return text
    if not isinstance(text, str):
        raise TokenizationError(f"{what} must be str or bytes, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizationError(
            f"{what} contains a character that cannot be encoded as UTF-8 at index {exc.start} "
            f"({text[exc.start]!r}, a lone surrogate); clean it with "
            "text.encode('utf-8', errors='replace').decode()") from None


class Vocab:
    """The tokenizer of a loaded model. Obtained as `model.vocab`."""

    def __init__(self, model) -> None:  # the Model it belongs to (model.py imports this module)
        self._model = model
        self._pieces: dict[int, bytes] = {}      # token → bytes of its piece (special tokens not rendered)
        self._eog: dict[int, bool] = {}          # token → is_eog(token), filled as tokens are seen
        # token → (is_eog, piece, piece as text or None when it is not whole UTF-8 by itself): what generation
        # needs per token in one dictionary look-up (see `generation_entry`).
        self._entries: dict[int, tuple[bool, bytes, str | None]] = {}
        self._n_tokens: int | None = None

    @property
    def _ptr(self):
        return C.llama_model_get_vocab(self._model._ptr)

    def _call(self, function, *args):
        """function(vocab pointer, *args) inside a use of the model: Model.close() in another thread waits
        for it instead of freeing the vocabulary under it."""
        with self._model._lifetime:
            return function(C.llama_model_get_vocab(self._model._ptr), *args)

    @property
    def n_tokens(self) -> int:
        n = self._n_tokens
        if n is None:
            n = self._n_tokens = self._call(C.llama_vocab_n_tokens)  # fixed for the model's life
        return n

    def __len__(self) -> int:
        return self.n_tokens

    # ---- special tokens (None where the model has none) ----
    def _special(self, token: int) -> int | None:
        return None if token == C.LLAMA_TOKEN_NULL else int(token)

    @property
    def bos(self) -> int | None:
        return self._special(self._call(C.llama_vocab_bos))

    @property
    def eos(self) -> int | None:
        return self._special(self._call(C.llama_vocab_eos))

    @property
    def eot(self) -> int | None:
        return self._special(self._call(C.llama_vocab_eot))

    @property
    def nl(self) -> int | None:
        return self._special(self._call(C.llama_vocab_nl))

    @property
    def pad(self) -> int | None:
        return self._special(self._call(C.llama_vocab_pad))

    @property
    def cls(self) -> int | None:
        return self._special(self._call(C.llama_vocab_cls))

    @property
    def sep(self) -> int | None:
        return self._special(self._call(C.llama_vocab_sep))

    @property
    def fim_tokens(self) -> tuple[int | None, int | None, int | None]:
        """The fill-in-the-middle markers: (prefix, suffix, middle)."""
        return (self._special(self._call(C.llama_vocab_fim_pre)), self._special(self._call(C.llama_vocab_fim_suf)),
                self._special(self._call(C.llama_vocab_fim_mid)))

    @property
    def add_bos(self) -> bool:
        return bool(self._call(C.llama_vocab_get_add_bos))

    @property
    def add_eos(self) -> bool:
        return bool(self._call(C.llama_vocab_get_add_eos))

    @property
    def kind(self) -> str:
        """The tokenizer type: "SPM", "BPE", "WPM", "UGM", "RWKV" (or "none"/"?" for others)."""
        kinds = {C.LLAMA_VOCAB_TYPE_NONE: "none", C.LLAMA_VOCAB_TYPE_SPM: "SPM", C.LLAMA_VOCAB_TYPE_BPE: "BPE",
                 C.LLAMA_VOCAB_TYPE_WPM: "WPM", C.LLAMA_VOCAB_TYPE_UGM: "UGM", C.LLAMA_VOCAB_TYPE_RWKV: "RWKV"}
        return kinds.get(self._call(C.llama_vocab_type), "?")

    def is_eog(self, token: int) -> bool:
        """Does this token end generation (EOS, EOT, or another end-of-generation token)?"""
        eog = self._eog.get(token)
        if eog is None:
            self._check_token(token)  # llama.cpp indexes its token table unchecked (SIGSEGV far outside)
            eog = self._eog[token] = bool(self._call(C.llama_vocab_is_eog, token))
        return eog

    def generation_entry(self, token: int) -> tuple[bool, bytes, str | None]:
        """(is_eog, piece bytes, the piece decoded when it is whole UTF-8 on its own else None) for a sampled
        token, cached: the generation loop's only per-token look-up into the vocabulary."""
        entry = self._entries.get(token)
        if entry is None:
            eog = self.is_eog(token)
            data = b"" if eog else self.piece(token)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # part of a character split across tokens, or invalid bytes
                text = None
            entry = self._entries[token] = (eog, data, text)
        return entry

    def is_control(self, token: int) -> bool:
        self._check_token(token)
        return bool(self._call(C.llama_vocab_is_control, token))

    def token_text(self, token: int) -> str:
        """The token's entry in the vocabulary, as stored (e.g. 'Ġhello' for byte-level BPE)."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def first_text_difference(self, other: Vocab, start: int = 0) -> tuple[int, bytes, bytes] | None:
        """(id, this text, other text) of the first token id >= start whose stored text differs between the two
        vocabularies, over the ids both have; None when they agree (what a draft model's check compares)."""
        get = C.llama_vocab_get_text
        with self._model._lifetime, other._model._lifetime:
            mine, theirs = self._ptr, other._ptr
            for i in range(start, min(self.n_tokens, other.n_tokens)):
                a, b = ffi.string(get(mine, i)), ffi.string(get(theirs, i))
                if a != b:
                    return i, a, b
        return None

    def token_bytes(self, token: int) -> bytes:
        """token_text's bytes, undecoded (what comparing two vocabularies compares)."""
        self._check_token(token)
        with self._model._lifetime:
            return ffi.string(C.llama_vocab_get_text(self._ptr, token))

    # ---- conversion ----
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokens of `text`. `add_special` adds BOS/EOS as the model asks; `parse_special` lets text such as
        '<|im_start|>' become its special token instead of plain characters."""
        data = encode_utf8(text)
        n_max = len(data) + 8
        tokens = ffi.new("llama_token[]", n_max)
        n = self._call(C.llama_tokenize, data, len(data), tokens, n_max, add_special, parse_special)
        if n < 0:
            if n == -(2**31):
                raise TokenizationError("the text is too long to tokenize (more than 2^31 tokens)")
            n_max = -n
            tokens = ffi.new("llama_token[]", n_max)
            n = self._call(C.llama_tokenize, data, len(data), tokens, n_max, add_special, parse_special)
            if n < 0:
                raise TokenizationError("llama_tokenize failed twice with a buffer of the size it asked for")
        return list(tokens[0:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token stands for. A multi-byte character may be split across tokens, so pieces
        are bytes; join and decode them (or use `detokenize`)."""
        if not special:
            cached = self._pieces.get(token)
            if cached is not None:
                return cached
        self._check_token(token)
        # A buffer of this call's own: the vocabulary is shared by the threads generating on its model.
        buf = ffi.new("char[]", 64)
        n = self._call(C.llama_token_to_piece, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = self._call(C.llama_token_to_piece, token, buf, len(buf), 0, special)
        data = ffi.unpack(buf, n)
        if not special:
            self._pieces[token] = data
        return data

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text of `tokens` (invalid UTF-8 at the edges of a partial sequence becomes U+FFFD)."""
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def _check_token(self, token: int) -> None:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < self.n_tokens:
            raise TokenizationError(f"token id {token!r} is outside the vocabulary (0 .. {self.n_tokens - 1})")
