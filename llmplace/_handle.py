"""The lifetime every wrapper of a native llama.cpp object shares: own one handle, free it once."""

from __future__ import annotations

import weakref
from typing import Callable

from ._ffi import ffi
from .errors import ClosedError


class NativeObject:
    """Owns one native handle. `close()` (or leaving a `with` block, or garbage collection, or interpreter
    exit) frees it exactly once; using the object afterwards raises ClosedError with `_closed_message`."""

    _handle = ffi.NULL
    _closed_message = "this object is closed"

    def _own(self, handle, free: Callable, *free_args) -> None:
        """Take ownership of `handle`; `free(handle, *free_args)` releases it."""
        self._handle = handle
        self._finalizer = weakref.finalize(self, free, handle, *free_args)

    @property
    def _ptr(self):
        if self._handle == ffi.NULL:
            raise ClosedError(self._closed_message)
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle == ffi.NULL

    def close(self) -> None:
        """Free the native object. Safe to call more than once."""
        if self._handle == ffi.NULL:
            return
        self._finalizer()
        self._handle = ffi.NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
