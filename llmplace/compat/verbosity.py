"""llama-cpp-python's two output switches: `set_verbose` and `suppress_stdout_stderr`.

llmplace never lets llama.cpp write to stderr on its own: its log goes to the `logging` logger "llmplace"
(llmplace/logs.py). So `set_verbose` sets that logger's level, and a program sees llama.cpp's messages when it
configures logging (e.g. `logging.basicConfig()`), as it does for any other library.
"""

from __future__ import annotations

import logging
import os
import sys


def set_verbose(verbose: bool) -> None:
    """llama.cpp's debug messages (verbose=True) or only its errors (False) reach the "llmplace" logger."""
    logging.getLogger("llmplace").setLevel(logging.DEBUG if verbose else logging.ERROR)


class suppress_stdout_stderr:
    """`with suppress_stdout_stderr(disable=False): ...` sends what the process writes to its stdout and stderr
    (Python's and native code's file descriptors 1 and 2) to os.devnull until the block ends. As in
    llama-cpp-python, the default disable=True makes it do nothing: callers pass `disable=self.verbose`."""

    _STREAMS = (("stdout", 1), ("stderr", 2))

    def __init__(self, disable: bool = True) -> None:
        self.disable = disable
        self._saved: list[tuple[str, int, object, int]] = []

    def __enter__(self) -> suppress_stdout_stderr:
        if self.disable:
            return self
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for name, fd in self._STREAMS:
                stream = getattr(sys, name)
                if stream is not None:
                    stream.flush()  # what Python buffered before the block still comes out
                self._saved.append((name, fd, stream, os.dup(fd)))
                os.dup2(devnull, fd)
                setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - closed in __exit__
        except BaseException:
            self.__exit__()
            raise
        finally:
            os.close(devnull)
        return self

    def __exit__(self, *exc_info) -> None:
        while self._saved:
            name, fd, stream, copy = self._saved.pop()
            replacement = getattr(sys, name)
            if replacement is not stream and replacement is not None:
                replacement.close()
            setattr(sys, name, stream)
            os.dup2(copy, fd)
            os.close(copy)
