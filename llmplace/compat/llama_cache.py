"""llama-cpp-python's prompt caches: `Llama.set_cache(LlamaRAMCache())` keeps the context state after each
completion, keyed by its tokens, and restores the entry sharing the longest prefix with a later prompt when
that beats what the context holds (e.g. when switching between a few long system prompts).

LlamaDiskCache keeps the states in files instead (one pickle per entry, in a folder that survives the process),
so a later process with the same model finds them; llama-cpp-python's needs the diskcache package, this one
nothing.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class LlamaState:
    """A saved context: its tokens and llama.cpp's state bytes (scores: an empty array; llama-cpp-python keeps
    the logits of logits_all models there)."""

    def __init__(self, input_ids: np.ndarray, scores: np.ndarray, n_tokens: int, llama_state: bytes,
                 llama_state_size: int, seed: int) -> None:
        self.input_ids, self.scores, self.n_tokens = input_ids, scores, n_tokens
        self.llama_state, self.llama_state_size, self.seed = llama_state, llama_state_size, seed


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BaseLlamaCache:
    """Maps token sequences to LlamaState; `cache[tokens]` returns the entry sharing the longest prefix."""

    def __init__(self, capacity_bytes: int = (2 << 30)) -> None:
        self.capacity_bytes = capacity_bytes

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

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and len(self.cache_state) > 0:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache  # llama-cpp-python's old name


class LlamaDiskCache(BaseLlamaCache):
    """States in files under cache_dir, least recently used dropped first beyond capacity_bytes (default 2 GiB).

    Each entry is one file holding (tokens, state), named by a hash of its tokens; the index of tokens is read
    from the folder when the cache is created, so entries written by an earlier process are found. Files are
    pickles: use a folder only you write to."""

    _SUFFIX = ".llamastate"

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = (2 << 30)) -> None:
        super().__init__(capacity_bytes)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[tuple[int, ...], Path] = OrderedDict()  # least recently used first
        for path in sorted(self.cache_dir.glob("*" + self._SUFFIX), key=lambda p: p.stat().st_mtime):
            try:
                with open(path, "rb") as f:
                    key, _ = pickle.load(f)
            except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
                continue  # a damaged or foreign file: not an entry
            self._index[tuple(key)] = path

    def _path(self, key: tuple[int, ...]) -> Path:
        digest = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()[:32]
        return self.cache_dir / (digest + self._SUFFIX)

    @property
    def cache_size(self) -> int:
        return sum(p.stat().st_size for p in self._index.values() if p.exists())

    def _keys(self):
        return self._index

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("Key not found")
        path = self._index[found]
        with open(path, "rb") as f:
            _, state = pickle.load(f)
        self._index.move_to_end(found)
        os.utime(path)  # recency survives the process too
        return state

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(key)
        path = self._path(key)
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            pickle.dump((list(key), value), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)  # a reader never sees half an entry
        self._index.pop(key, None)
        self._index[key] = path
        while self.cache_size > self.capacity_bytes and self._index:
            _, oldest = self._index.popitem(last=False)
            oldest.unlink(missing_ok=True)
