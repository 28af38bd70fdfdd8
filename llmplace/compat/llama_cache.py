"""llama-cpp-python's prompt caches: `Llama.set_cache(LlamaRAMCache())` keeps the context state after each
completion, keyed by its tokens, and restores the entry sharing the longest prefix with a later prompt when
that beats what the context holds (e.g. when switching between a few long system prompts).

LlamaDiskCache keeps the states in files instead (one per entry, in a folder that survives the process), so a
later process with the same model finds them; llama-cpp-python's needs the diskcache package, this one nothing.
Its files hold data only (a JSON header and raw bytes, see _StateFile), never pickles: llama-cpp-python's
unpickles whatever it finds in the folder, so a file planted there runs code in the process that opens it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import struct
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..context import common_prefix_length
from ..errors import InvalidParameterError
# llama-cpp-python's llama_cache star-imports llama_types, so code finds the types here too
from .llama_types import *  # noqa: F403

logger = logging.getLogger("llmplace")


class LlamaState:
    """A saved context: its tokens and llama.cpp's state bytes (scores: an empty array; llama-cpp-python keeps
    the logits of logits_all models there)."""

    def __init__(self, input_ids: np.ndarray, scores: np.ndarray, n_tokens: int, llama_state: bytes,
                 llama_state_size: int, seed: int) -> None:
        self.input_ids, self.scores, self.n_tokens = input_ids, scores, n_tokens
        self.llama_state, self.llama_state_size, self.seed = llama_state, llama_state_size, seed


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return common_prefix_length(a, b)


class BaseLlamaCache:
    """Maps token sequences to LlamaState; `cache[tokens]` returns the entry sharing the longest prefix."""

    def __init__(self, capacity_bytes: int = (2 << 30)) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, numbers.Real) or not (
                capacity_bytes >= 0):
            raise InvalidParameterError(f"capacity_bytes must be a number of bytes (>= 0), not {capacity_bytes!r}")
        self.capacity_bytes: float = capacity_bytes

    @property
    def cache_size(self) -> int:
        raise NotImplementedError

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        raise NotImplementedError

    def _keys(self):
        """The token tuples held."""
        raise NotImplementedError

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_len = None, 0
        for k in self._keys():
            n = longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        raise NotImplementedError

    def _forget(self, state: LlamaState) -> None:
        """Drop the entry this cache handed out as `state` (llama.cpp refused it). A cache defined elsewhere
        keeps its entries: only the warning of forget_unusable_state is given."""


def forget_unusable_state(cache: BaseLlamaCache, state: LlamaState, reason: Exception) -> None:
    """A completion found `state` in `cache` and llama.cpp refused to load it (a cache file forged with a valid
    checksum, state bytes from another model or context size): warn, drop the entry so it is not tried again,
    and let the completion compute its prompt from scratch (the context was cleared by the failed load)."""
    warnings.warn(f"a prompt cache entry of {state.n_tokens} tokens was unusable and is ignored (llama.cpp refused "
                  f"its state: {reason}); the prompt is computed again", RuntimeWarning, stacklevel=2)
    forget = getattr(cache, "_forget", None)
    if forget is not None:
        forget(state)


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, least recently used dropped first beyond capacity_bytes (default 2 GiB)."""

    def __init__(self, capacity_bytes: int = (2 << 30)) -> None:
        super().__init__(capacity_bytes)
        self.cache_state: OrderedDict[tuple[int, ...], LlamaState] = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.llama_state_size for state in self.cache_state.values())

    def _keys(self):
        return self.cache_state

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(found)
        return self.cache_state[found]

    def _forget(self, state: LlamaState) -> None:
        for key in [key for key, value in self.cache_state.items() if value is state]:
            del self.cache_state[key]

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and len(self.cache_state) > 0:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache  # llama-cpp-python's old name


class CorruptStateFile(Exception):
    """A cache file that is not an intact entry written by _StateFile (foreign, truncated, altered)."""


class _StateFile:
    """The on-disk form of one LlamaDiskCache entry: data only, so reading a file can never run code.

        magic "LLMPSTAT" | u32 header length | header (UTF-8 JSON object) | input_ids | scores | state

    The header says the format version, the entry's key tokens, the sizes of the three raw sections
    (input_ids int32, scores float32, llama.cpp's state bytes), n_tokens, seed, the model architecture the state
    was saved from (llama.cpp writes it first in the state) and a SHA-256 of everything after the header. The
    index is built from headers alone; the checksum is verified when an entry is used.
    """

    MAGIC = b"LLMPSTAT"
    VERSION = 1
    _PREFIX = struct.Struct("<8sI")
    MAX_HEADER_BYTES = 64 << 20  # ~8M key tokens: far beyond any context, and a bound on what a bad file costs

    @staticmethod
    def state_arch(state: bytes) -> str | None:
        """The architecture name llama.cpp writes at the start of a context state (u32 length + text)."""
        if len(state) < 4:
            return None
        (n,) = struct.unpack_from("<I", state)
        raw = state[4:4 + n] if n <= 256 else b""
        return raw.decode("utf-8", "replace") if len(raw) == n and n else None

    @classmethod
    def encode(cls, key: tuple[int, ...], value: LlamaState) -> bytes:
        state = bytes(value.llama_state)
        input_ids = np.ascontiguousarray(np.asarray(value.input_ids).astype(np.int32, casting="same_kind"))
        scores = np.ascontiguousarray(np.asarray(value.scores if value.scores is not None else np.empty((0, 0)),
                                                 dtype=np.float32))
        payload = input_ids.tobytes() + scores.tobytes() + state
        seed = value.seed
        header = {"version": cls.VERSION, "key": [int(t) for t in key], "n_tokens": int(value.n_tokens),
                  "input_ids": int(input_ids.size), "scores_shape": [int(d) for d in scores.shape],
                  "state_size": len(state), "seed": None if seed is None else int(seed),
                  "arch": cls.state_arch(state), "sha256": hashlib.sha256(payload).hexdigest()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        return cls._PREFIX.pack(cls.MAGIC, len(raw)) + raw + payload

    @classmethod
    def read_header(cls, f, file_size: int) -> dict:
        """The header of an open entry file, checked against the file's size; CorruptStateFile otherwise."""
        prefix = f.read(cls._PREFIX.size)
        if len(prefix) != cls._PREFIX.size:
            raise CorruptStateFile("shorter than the header")
        magic, n = cls._PREFIX.unpack(prefix)
        if magic != cls.MAGIC:
            raise CorruptStateFile("not a llmplace state file (wrong magic; an old pickle or a foreign file?)")
        if n > min(cls.MAX_HEADER_BYTES, file_size - cls._PREFIX.size):
            raise CorruptStateFile(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"), parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise CorruptStateFile(f"unreadable header ({exc})") from None
        cls._check_header(header, file_size - cls._PREFIX.size - n)
        return header

    @classmethod
    def _check_header(cls, header, payload_size: int) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(header, dict) or header.get("version") != cls.VERSION:
            version = header.get('version') if isinstance(header, dict) else header
            raise CorruptStateFile(f"unknown format version {version!r}")
        key, shape = header.get("key"), header.get("scores_shape")
        sizes: list[Any] = [header.get(k) for k in ("n_tokens", "input_ids", "state_size")]  # ints: checked below
        if (not isinstance(key, list) or not all(is_int(t) and -2**31 <= t < 2**31 for t in key)
                or not all(is_int(v) and v >= 0 for v in sizes)
                or not isinstance(shape, list) or len(shape) > 2 or not all(is_int(d) and d >= 0 for d in shape)
                or not (header.get("seed") is None or is_int(header["seed"]))
                or not (header.get("arch") is None or isinstance(header["arch"], str))
                or not isinstance(header.get("sha256"), str)):
            raise CorruptStateFile("malformed header fields")
        n_tokens, n_ids, state_size = sizes
        n_scores = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n_tokens > n_ids or 4 * n_ids + 4 * n_scores + state_size != payload_size:
            raise CorruptStateFile("the sizes in the header do not match the file (truncated or altered)")

    @classmethod
    def decode(cls, path: Path) -> tuple[tuple[int, ...], LlamaState]:
        """Read and verify a whole entry; CorruptStateFile when any check fails."""
        with open(path, "rb") as f:
            header = cls.read_header(f, os.fstat(f.fileno()).st_size)
            payload = f.read()
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise CorruptStateFile("checksum mismatch (the file was altered or damaged)")
        n_ids, shape = header["input_ids"], header["scores_shape"]
        ids_end = 4 * n_ids
        scores_end = ids_end + 4 * (int(np.prod(shape, dtype=np.int64)) if shape else 1)
        state = payload[scores_end:]
        if header["arch"] != cls.state_arch(state):
            raise CorruptStateFile("the state does not hold the architecture its header names")
        value = LlamaState(input_ids=np.frombuffer(payload[:ids_end], dtype=np.int32).astype(np.intc),
                           scores=np.frombuffer(payload[ids_end:scores_end], dtype=np.float32).reshape(shape).copy(),
                           n_tokens=header["n_tokens"], llama_state=state, llama_state_size=len(state),
                           seed=header["seed"])
        return tuple(header["key"]), value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class LlamaDiskCache(BaseLlamaCache):
    """States in files under cache_dir, least recently used dropped first beyond capacity_bytes (default 2 GiB).

    Each entry is one file (see _StateFile: a JSON header and raw bytes, nothing that executes), named by a hash
    of its tokens; the index of tokens is read from the file headers when the cache is created, so entries
    written by an earlier process are found. A file that does not verify (foreign, truncated, altered: its
    checksum is checked before its state is used) is skipped with a warning on the "llmplace" logger, never
    loaded; files of llama-cpp-python's pickle format are skipped the same way, unopened."""

    _SUFFIX = ".llamastate"

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = (2 << 30)) -> None:
        super().__init__(capacity_bytes)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[tuple[int, ...], Path] = OrderedDict()  # least recently used first
        # the key of each state handed out and still in use (a state is a fresh copy: identity names its entry)
        self._handed_out: weakref.WeakKeyDictionary[LlamaState, tuple[int, ...]] = weakref.WeakKeyDictionary()
        entries = []
        for path in self.cache_dir.glob("*" + self._SUFFIX):
            try:
                with open(path, "rb") as f:
                    stat = os.fstat(f.fileno())
                    header = _StateFile.read_header(f, stat.st_size)
            except (OSError, CorruptStateFile) as exc:
                logger.warning("LlamaDiskCache: skipping %s: %s", path, exc)
                continue
            entries.append((stat.st_mtime, path, tuple(header["key"])))
        for _, path, key in sorted(entries, key=lambda e: e[0]):
            self._index[key] = path

    def _path(self, key: tuple[int, ...]) -> Path:
        digest = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()[:32]
        return self.cache_dir / (digest + self._SUFFIX)

    @property
    def cache_size(self) -> int:
        return sum(p.stat().st_size for p in self._index.values() if p.exists())

    def _keys(self):
        return self._index

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        key = tuple(key)
        while True:  # an entry that fails verification is dropped and the next best prefix tried
            found = self._find_longest_prefix_key(key)
            if found is None:
                raise KeyError("Key not found")
            path = self._index[found]
            try:
                stored_key, state = _StateFile.decode(path)
                if stored_key != found:
                    raise CorruptStateFile("the file now holds another entry")
            except (OSError, CorruptStateFile) as exc:
                logger.warning("LlamaDiskCache: ignoring %s: %s", path, exc)
                del self._index[found]
                continue
            self._index.move_to_end(found)
            try:
                os.utime(path)  # recency survives the process too
            except OSError:
                pass
            self._handed_out[state] = found
            return state

    def _forget(self, state: LlamaState) -> None:
        """Delete the entry's file too: it verified (a valid checksum), so it is one of ours, and a later
        process would only be refused it again."""
        key = self._handed_out.pop(state, None)
        path = self._index.pop(key, None) if key is not None else None
        if path is not None:
            path.unlink(missing_ok=True)

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        if not all(hasattr(value, name) for name in ("input_ids", "scores", "n_tokens", "llama_state", "seed")):
            raise InvalidParameterError(f"LlamaDiskCache stores LlamaState objects (from Llama.save_state), "
                                        f"not {type(value).__name__}")
        key = tuple(int(t) for t in key)
        data = _StateFile.encode(key, value)
        path = self._path(key)
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)  # a reader never sees half an entry
        self._index.pop(key, None)
        self._index[key] = path
        while self.cache_size > self.capacity_bytes and self._index:
            _, oldest = self._index.popitem(last=False)
            oldest.unlink(missing_ok=True)
