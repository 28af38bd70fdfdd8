"""The failure path of native calls: llama.cpp's log is captured per thread, so the exception of a failed call
quotes the lines of that call only, even while other threads load models or fail at the same time."""

from __future__ import annotations

import shutil
import threading

import pytest

import llmplace
from llmplace import ModelLoadError, logs
from llmplace._ffi import C, ffi
from llmplace.backends import ensure_initialized
from llmplace.native_errors import NO_REASON, is_nonzero, native_call


def _missing_a_tensor(tmp_path, source):
    """A copy of `source` that llmplace's own validation passes and llama.cpp refuses: a tensor renamed, so the
    loader reports a missing tensor (a line of llama.cpp's log, not a Python check)."""
    from gguf import GGUFReader

    path = tmp_path / "missing-tensor.gguf"
    shutil.copy(source, path)
    reader = GGUFReader(path, "r+")
    name = next(t for t in reader.tensors if t.name == "output_norm.weight").field.parts[1]
    name[-1] = ord("z")  # output_norm.weighz: same length, so the file's layout is unchanged
    reader.data.flush()
    del reader
    return path


def test_a_failed_load_quotes_only_its_own_threads_log(tmp_path, tiny_llama_path):
    damaged = _missing_a_tensor(tmp_path, tiny_llama_path)
    ensure_initialized()
    stop, errors = threading.Event(), []
    other_lines: list[str] = []
    rounds = [0]

    def fail_elsewhere():
        # A raw load that fails at once, in a loop, with its own capture: it does not take the load lock
        # llmplace.load holds, so its log lines arrive while the other threads' loads run.
        params = C.llama_model_default_params()
        try:
            while not stop.is_set():
                with logs.capture() as lines:
                    assert C.llama_model_load_from_file(b"/nonexistent/other-thread.gguf", params) == ffi.NULL
                other_lines.extend(lines)
                rounds[0] += 1
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    def load_fine():
        try:
            for _ in range(3):
                llmplace.load(tiny_llama_path, progress=False).close()
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    noisy, fine = threading.Thread(target=fail_elsewhere), threading.Thread(target=load_fine)
    noisy.start()
    fine.start()
    messages = []
    try:
        before = rounds[0]
        for _ in range(5):
            with pytest.raises(ModelLoadError) as info:
                llmplace.load(damaged, progress=False)
            messages.append(str(info.value))
        during = rounds[0] - before
        fine.join(300)
    finally:
        stop.set()
        noisy.join(60)
    assert errors == []
    assert during > 0  # the other thread's failures really overlapped these loads
    for message in messages:
        assert "output_norm.weight" in message and "other-thread" not in message, message
    assert any("other-thread" in line for line in other_lines)
    assert not any("output_norm" in line or "missing-tensor" in line for line in other_lines)


def test_native_call_raises_the_callers_error_with_llama_cpps_reason(tmp_path):
    ensure_initialized()
    params = C.llama_model_default_params()
    with pytest.raises(ModelLoadError, match=r"^could not load: .*no-such-model\.gguf") as info:
        native_call(C.llama_model_load_from_file, str(tmp_path / "no-such-model.gguf").encode(), params,
                    error=lambda reason: ModelLoadError(f"could not load: {reason}"))
    assert NO_REASON not in str(info.value)


def test_native_call_without_a_log_line_says_no_reason_was_given():
    with pytest.raises(ValueError, match=f"code 3: {NO_REASON}"):
        native_call(lambda: 3, error=lambda reason: ValueError(f"code 3: {reason}"), failed=is_nonzero)
    assert native_call(lambda: 0, error=ValueError, failed=is_nonzero) == 0
