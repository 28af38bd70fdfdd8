"""`quantize`: write a GGUF model with its weights converted to another type, with llama.cpp's own quantizer.

Named `quantization` so that importing it never hides the public function `llmplace.quantize`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ._ffi import C, ffi
from .backends import ensure_initialized
from .errors import InvalidParameterError, ModelLoadError
from .gguf_info import check_header
from .native_errors import is_nonzero, native_call

# Type name → llama_ftype. Only types that need no importance matrix: the IQ1/IQ2/IQ3 families need one,
# which llmplace does not compute.
QUANTIZE_TYPES = {
    "f32": C.LLAMA_FTYPE_ALL_F32, "f16": C.LLAMA_FTYPE_MOSTLY_F16, "bf16": C.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "q6_k": C.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q5_0": C.LLAMA_FTYPE_MOSTLY_Q5_0, "q5_1": C.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q5_k_s": C.LLAMA_FTYPE_MOSTLY_Q5_K_S, "q5_k_m": C.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": C.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q4_k_s": C.LLAMA_FTYPE_MOSTLY_Q4_K_S, "q4_k_m": C.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "iq4_nl": C.LLAMA_FTYPE_MOSTLY_IQ4_NL, "iq4_xs": C.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "q3_k_s": C.LLAMA_FTYPE_MOSTLY_Q3_K_S, "q3_k_m": C.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q3_k_l": C.LLAMA_FTYPE_MOSTLY_Q3_K_L, "q2_k": C.LLAMA_FTYPE_MOSTLY_Q2_K,
}


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (os.umask can only set it, and setting
    it briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)
    return mask


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type: str = "q4_0", *,
             n_threads: int | None = None, allow_requantize: bool = True, quantize_output_tensor: bool = True,
             pure: bool = False) -> Path:
    """Write `dst`, the GGUF model `src` with its weights quantized to `type` (see QUANTIZE_TYPES), and return it.

    allow_requantize: accept a source whose weights are already quantized (they are dequantized first,
    which loses more than quantizing from f16/f32: fine for a draft model). pure: every tensor to `type`
    (by default llama.cpp keeps some, e.g. norms, in higher precision). The file is written under a
    temporary name next to `dst` and renamed when complete, so a failure never leaves a partial model.
    """
    from .context import default_threads

    src_path = Path(os.fspath(src)).expanduser()
    dst_path = Path(os.fspath(dst)).expanduser()
    key = type.lower() if isinstance(type, str) else type
    if key not in QUANTIZE_TYPES:
        raise InvalidParameterError(f"unknown quantization type {type!r}; choose one of {', '.join(QUANTIZE_TYPES)}")
    if n_threads is None:
        n_threads = default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= 1024:
        raise InvalidParameterError(f"n_threads must be an int between 1 and 1024, not {n_threads!r}")
    check_header(src_path)  # missing, a directory, not GGUF, unsupported version: ModelLoadError
    if dst_path.is_dir():
        raise InvalidParameterError(f"the destination {dst_path} is a directory; pass a file path such as "
                                    f"{dst_path / (src_path.stem + '.' + key + '.gguf')}")
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        # llama.cpp maps the source while writing: writing over it would corrupt both.
        raise InvalidParameterError(f"the destination is the source file {src_path}; write to another path")
    folder = dst_path.parent
    if not folder.is_dir():
        raise InvalidParameterError(f"the destination folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (dst_path.exists() and not os.access(dst_path, os.W_OK)):
        denied = folder if not dst_path.exists() else dst_path
        raise PermissionError(f"cannot write {dst_path}: no write permission on {denied}")

    ensure_initialized()
    params = ffi.new("llama_model_quantize_params *", C.llama_model_quantize_default_params())
    params.nthread = n_threads
    params.ftype = QUANTIZE_TYPES[key]
    params.allow_requantize = bool(allow_requantize)
    params.quantize_output_tensor = bool(quantize_output_tensor)
    params.pure = bool(pure)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst_path.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise PermissionError(f"cannot write {dst_path}: creating a file in {folder} failed ({exc.strerror}); "
                              "choose a writable folder") from None
    os.close(fd)
    try:
        def quantize_error(reason: str) -> Exception:
            if "requantizing" in reason:
                return InvalidParameterError(f"{src_path} is already quantized; pass allow_requantize=True to "
                                             f"requantize it to {key} ({reason})")
            return ModelLoadError(f"llama.cpp could not quantize {src_path} to {key}: {reason}")

        native_call(C.llama_model_quantize, str(src_path).encode(), tmp_name.encode(), params, error=quantize_error,
                    failed=is_nonzero)
        # mkstemp made the file private (0600); give it the mode any new file gets (0666 less the umask)
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, dst_path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return dst_path
