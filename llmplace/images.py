"""Images: a projector (mmproj GGUF) loaded for a Model turns images into the model's input embeddings, through
llama.cpp's libmtmd.

    model = llmplace.load("text.gguf")
    with Projector(model, "mmproj.gguf") as projector:
        prompt = projector.tokenize(f"{projector.marker}\\nWhat is in this image?", [load_image("cat.png")])
        print(llmplace.generate(model, prompt, max_tokens=32, temperature=0).text)

- `load_image` reads an image from bytes, a file path, a `file://` or `data:` URL, or (only with
  allow_fetch=True) an http(s) URL, and checks its format and size from its header before libmtmd decodes it.
- `Projector.tokenize` splits a prompt at its image markers into an `ImagePrompt`: text tokens and image chunks.
- An ImagePrompt is a prompt like a token list: `generate`, `stream_generate`, `Chat` and the drop-in take it.
  Its `prefill(context)` computes it into a Context (text through Context.decode, each image encoded by the
  projector and its embeddings decoded through Context.decode_media), reusing the context's cached prefix, and
  generation then goes on through the one token loop (llmplace.token_loop).

Image positions are recorded in Context.tokens as placeholder ids: negative numbers drawn from the image's
SHA-256, the same for every position of one image. Prefix reuse thus matches an image only against the same
image at the same place, and an image is always computed whole.

Every input on which libmtmd would abort the process or misbehave is checked here first: the image's format and
dimensions (its header), the number of markers against the number of images, a prompt that must end in text (the
first token is drawn from its last logits), non-causal image attention against the batch sizes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

from . import logs
from ._ffi import C, CData, c_string, ffi
from ._handle import NativeObject
from .context import Context, default_threads
from .errors import (AbortedError, ContextOverflowError, DecodeError, ImageError, InvalidParameterError,
                     MalformedImageError, ModelLoadError, NoProjectorError, UnsupportedImageFormatError)
from .model import Model
from .native_errors import reason

__all__ = ["Image", "ImagePrompt", "Projector", "load_image", "MAX_IMAGE_BYTES", "MAX_IMAGE_SIDE",
           "MAX_IMAGE_PIXELS"]

# Limits checked from the header, before libmtmd's decoder (stb_image) allocates width x height x 3 bytes.
MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 64 << 20  # 8192 x 8192: 192 MiB of RGB

# What each format's first bytes are (for the error message of formats libmtmd's decoder does not read).
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"WEBP", 8, "WebP"), (b"ftypavif", 4, "AVIF"), (b"ftypheic", 4, "HEIC"), (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"), (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"), (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"<svg", 0, "SVG"), (b"<?xml", 0, "SVG/XML"), (b"%PDF", 0, "PDF"), (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"), (b"RIFF", 0, "RIFF (WAV/AVI)"), (b"ID3", 0, "MP3"),
    (b"fLaC", 0, "FLAC"),
)
_SUPPORTED = "PNG, JPEG, GIF or BMP"


@dataclass(frozen=True)
class Image:
    """An image's encoded bytes, checked: its format ("png", "jpeg", "gif", "bmp") and size from its header."""

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int

    @functools.cached_property
    def sha256(self) -> str:
        """The hash libmtmd identifies the image by (and llmplace's placeholder ids derive from)."""
        return hashlib.sha256(self.data).hexdigest()


def _too_short(fmt: str) -> MalformedImageError:
    return MalformedImageError(f"the {fmt} image is truncated: its header ends early; send the whole file")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _too_short("PNG") if len(data) < 33 else MalformedImageError(
            "the PNG image has no IHDR chunk after its signature (a damaged file)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gif_size(data: bytes) -> tuple[int, int]:
    if len(data) < 10:
        raise _too_short("GIF")
    width, height = struct.unpack("<HH", data[6:10])
    return width, height


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise _too_short("BMP")
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height means rows top-down


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """The frame size from the first SOFn marker (segments are walked by their lengths)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise MalformedImageError(f"the JPEG image is damaged: no segment marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if length < 2:
            raise MalformedImageError(f"the JPEG image is damaged: a segment of length {length} at byte {i}")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xD9:  # end of image before any frame
            break
        i += 2 + length
    raise _too_short("JPEG")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png", _png_size),
    (b"\xff\xd8\xff", "jpeg", _jpeg_size),
    (b"GIF87a", "gif", _gif_size),
    (b"GIF89a", "gif", _gif_size),
    (b"BM", "bmp", _bmp_size),
)


def image_from_bytes(data: bytes | bytearray | memoryview) -> Image:
    """Check encoded image bytes: a format libmtmd decodes (PNG, JPEG, GIF, BMP), a header that says its size,
    and a size within MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS. UnsupportedImageFormatError for other formats,
    MalformedImageError for a damaged or oversized image."""
    data = bytes(data)
    if not data:
        raise MalformedImageError("the image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise MalformedImageError(f"the image has {len(data)} bytes, more than llmplace takes ({MAX_IMAGE_BYTES}); "
                                  "send a smaller file")
    for signature, fmt, size in _SIGNATURES:
        if data.startswith(signature):
            width, height = size(data)
            if width <= 0 or height <= 0:
                raise MalformedImageError(f"the {fmt.upper()} image says it is {width}x{height} pixels (a damaged "
                                          "header)")
            if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                raise MalformedImageError(
                    f"the {fmt.upper()} image is {width}x{height} pixels, larger than llmplace decodes (at most "
                    f"{MAX_IMAGE_SIDE} a side and {MAX_IMAGE_PIXELS} pixels); scale it down first")
            return Image(data, fmt, width, height)
    for signature, offset, name in _UNSUPPORTED_SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            raise UnsupportedImageFormatError(f"the image is {name}, which libmtmd cannot decode: convert it to "
                                              f"{_SUPPORTED}")
    raise UnsupportedImageFormatError(f"the data is not an image in a format libmtmd decodes (it begins "
                                      f"{data[:8]!r}); send {_SUPPORTED}")


def _data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MalformedImageError("the data: URL has no ',' before its data (expected data:image/png;base64,...)")
    media_type = header[5:].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise UnsupportedImageFormatError(f"the data: URL holds {media_type!r}, not an image")
    if not header.endswith(";base64"):
        raise MalformedImageError("the data: URL is not base64-encoded (expected data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedImageError(f"the data: URL's base64 payload does not decode: {exc}") from None


def _fetch(url: str, timeout: float) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked
            data: bytes = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageError(f"could not fetch the image at {url}: {exc}") from None
    return data


ImageSource = Union[Image, bytes, bytearray, memoryview, str, "os.PathLike[str]"]


def load_image(source: ImageSource, *, allow_fetch: bool = False, timeout: float = 30.0) -> Image:
    """An Image from encoded bytes, a file path, a file:// or data: URL, or an http(s) URL (fetched only when
    allow_fetch=True: a server must not fetch what a client names unless its operator chose to). Checked by
    image_from_bytes; ImageError (a ValueError) when the source cannot be read."""
    if isinstance(source, Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return image_from_bytes(source)
    if isinstance(source, str):
        lowered = source[:8].lower()
        if lowered.startswith("data:"):
            return image_from_bytes(_data_url(source))
        if lowered.startswith(("http://", "https://")):
            if not allow_fetch:
                raise ImageError(f"the image is a web address ({source[:80]}); fetching is off: pass the image's "
                                 "bytes, a file path or a data: URL, or allow fetching (allow_fetch=True, or "
                                 "`llmplace serve --allow-image-fetch`)")
            return image_from_bytes(_fetch(source, timeout))
        if lowered.startswith("file://"):
            from urllib.parse import unquote, urlparse

            source = unquote(urlparse(source).path)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidParameterError(f"an image must be bytes, a path, or a data:/file:/http(s) URL, not "
                                    f"{type(source).__name__}")
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise MalformedImageError(f"{path} has {size} bytes, more than llmplace takes ({MAX_IMAGE_BYTES})")
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not read the image file {str(path)[:200]!r}: {exc}") from None
    return image_from_bytes(data)


# --------------------------------------------------------------------------------------------------------
# The projector
# --------------------------------------------------------------------------------------------------------


class _Piece(NamedTuple):
    start: int  # position of its first token in the prompt
    end: int
    tokens: list[int] | None  # a text chunk's tokens; None for an image
    chunk: CData  # the mtmd_input_chunk (owned by the ImagePrompt's chunk list)


def _placeholder(sha256: str) -> int:
    """The id recorded in Context.tokens for every position of this image: negative (no vocabulary has it),
    from the image's hash, so that the same image at the same place matches and another one does not."""
    try:
        return -1 - int(sha256[:8], 16) % (1 << 30)
    except ValueError:
        return -1


class ImagePrompt:
    """A prompt of text and images, tokenized by a Projector (`Projector.tokenize`). Pass it where a prompt goes
    (generate, stream_generate); `tokens` are its text tokens and image placeholders, `n_images` its images."""

    def __init__(self, projector: Projector, chunks: CData, pieces: list[_Piece], tokens: list[int],
                 n_images: int) -> None:
        self.projector, self.tokens, self.n_images = projector, tokens, n_images
        self._pieces = pieces
        self._chunks = chunks
        self._finalizer = weakref.finalize(self, C.mtmd_input_chunks_free, chunks)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"<ImagePrompt of {len(self.tokens)} tokens, {self.n_images} image(s)>"

    def close(self) -> None:
        """Free the image chunks now (else when the prompt is garbage collected)."""
        self._finalizer()

    def prefill(self, context: Context) -> int:
        """Compute the prompt into `context` after the longest prefix it already holds (an image counts whole),
        leaving the last token's logits for the first draw. Returns the number of cached tokens reused."""
        if context.model is not self.projector.model:
            raise InvalidParameterError("the context belongs to another model than the projector's")
        if not self._finalizer.alive:
            raise InvalidParameterError("this ImagePrompt was closed; tokenize the prompt again")
        tokens = self.tokens
        if len(tokens) >= context.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens (images included) but the context holds {context.n_ctx} (and "
                "generation needs at least one more); use a larger n_ctx, or fewer or smaller images")
        cached = context.reuse_prefix(tokens)
        for piece in self._pieces:
            if piece.tokens is None and piece.start < cached < piece.end:
                context.truncate(piece.start)  # part of an image is cached (an aborted decode): compute it whole
                cached = piece.start
                break
        for piece in self._pieces:
            if piece.end <= cached:
                continue
            if piece.tokens is not None:
                context.decode(piece.tokens[max(0, cached - piece.start):])
            else:
                self.projector._check_fits(piece, context)
                context.decode_media(tokens[piece.start:piece.end],
                                     functools.partial(self.projector._evaluate, piece.chunk, context.n_batch))
        return cached


def _free_projector(handle: CData) -> None:
    C.mtmd_free(handle)


def encoder_device(device: str | None, use_gpu: bool) -> tuple[bool, CData]:
    """(use_gpu, ggml device or NULL) for libmtmd: where the image encoder goes. device: a device's name
    ("CUDA0", "Vulkan0", "RPC0[host:port]", as llmplace.devices() lists them), "CPU" (or "host") for host memory,
    None for libmtmd's choice (the first GPU when use_gpu, else the CPU). The encoder is one graph on one device:
    libmtmd does not split it or take per-tensor placement rules."""
    from .backends import ensure_initialized, native_devices
    from .errors import DeviceNotFoundError

    if device is None:
        return bool(use_gpu), ffi.NULL
    if not isinstance(device, str):
        raise InvalidParameterError(f"device must be a device name such as 'CUDA0' or 'CPU', not {device!r}")
    if device.upper() in ("CPU", "HOST"):
        return False, ffi.NULL
    ensure_initialized()
    for dev in native_devices():
        if dev.name == device:
            return True, dev.ptr
    names = [dev.name for dev in native_devices()]
    raise DeviceNotFoundError(f"no device named {device!r} for the image encoder; there are {names}")


class Projector(NativeObject):
    """A multimodal projector (an "mmproj" GGUF) loaded for `model`: it encodes images into `model`'s input
    embeddings. n_threads: threads of the image encoder (default: Context's default). device: where the encoder
    and its weights go ("CUDA0", "RPC0[host:port]" ..., or "CPU"); by default the first GPU where there is one
    (use_gpu=False: the CPU). warmup: run one encode at load (allocates its compute buffers then, so a lack of
    memory shows at load). Closed with the model (or by close() / `with`)."""

    _closed_message = "this Projector is closed (or its Model was closed); load it again"

    def __init__(self, model: Model, path: str | os.PathLike[str], *, n_threads: int | None = None,
                 device: str | None = None, use_gpu: bool = True, warmup: bool = True) -> None:
        if not isinstance(model, Model):
            raise InvalidParameterError(f"a Projector is loaded for a Model, not {type(model).__name__}")
        if model.dry_run or model.vocab_only:
            raise InvalidParameterError("this Model has no weights in memory (a dry run or vocab_only): load it "
                                        "fully to use images with it")
        path = Path(path)
        self.path = path
        self.model = model
        if n_threads is None:
            n_threads = default_threads()
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= 1024:
            raise InvalidParameterError(f"n_threads must be an int from 1 to 1024, not {n_threads!r}")
        _check_projector_file(path)
        logs.install()
        params = C.mtmd_context_params_default()
        params.use_gpu, params.device = encoder_device(device, use_gpu)
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = bool(warmup)
        with model._lifetime:
            with logs.capture() as messages:
                handle = C.mtmd_init_from_file(os.fsencode(path), model._ptr, params)
            if handle == ffi.NULL:
                raise ModelLoadError(f"libmtmd could not load the projector {path.name} for this model: "
                                     f"{reason(messages)}. Use the mmproj file made for this model's family")
            self._own(handle, _free_projector)
            model._contexts.add(self)  # closed before the model, as its contexts are
        # libmtmd keeps the last encoding in the context (mtmd_get_output_embd): one image at a time, whichever
        # Context (and thread) it is computed for
        self._encoding = threading.Lock()
        self.marker: str = c_string(C.mtmd_default_marker())
        self.supports_vision = bool(C.mtmd_support_vision(handle))
        self.supports_audio = bool(C.mtmd_support_audio(handle))
        if not self.supports_vision:
            self.close()
            raise ModelLoadError(f"{path.name} has no vision encoder (an audio-only projector): llmplace takes "
                                 "images only")

    def __repr__(self) -> str:
        return f"<Projector {self.path.name} for {self.model!r}>"

    def tokenize(self, prompt: str, images: Sequence[ImageSource], *, add_special: bool = True,
                 parse_special: bool = True, allow_fetch: bool = False) -> ImagePrompt:
        """Split `prompt` at its image markers (`self.marker`, one per image, in order) into text tokens and
        image chunks. Images are anything load_image takes. The prompt must end with text after its last image
        (the first generated token is drawn from the last text token's logits). add_special: begin with BOS when
        the model wants one (never an EOS at the end)."""
        if not isinstance(prompt, str):
            raise InvalidParameterError(f"prompt must be a str, not {type(prompt).__name__}")
        if isinstance(images, (str, bytes, Image)) or not isinstance(images, Sequence):
            raise InvalidParameterError("images must be a list of images (bytes, paths, URLs or Image objects)")
        n_markers = prompt.count(self.marker)
        if n_markers != len(images):
            raise InvalidParameterError(
                f"the prompt has {n_markers} image marker(s) {self.marker!r} but {len(images)} image(s) were given: "
                "put the marker where each image goes")
        loaded = [load_image(image, allow_fetch=allow_fetch) for image in images]
        if loaded and not prompt[prompt.rindex(self.marker) + len(self.marker):]:
            raise InvalidParameterError("the prompt ends with an image: add text after it (with a chat template, "
                                        "the assistant's turn)")
        vocab = self.model.vocab
        if add_special and vocab.add_bos and vocab.bos is not None:
            # BOS as text: libmtmd's own add_special would also append EOS for vocabularies that add one, which
            # ends a chat before its reply
            prompt = vocab.token_text(vocab.bos) + prompt
            parse_special = True
        data = prompt.encode("utf-8")
        with self._lifetime:
            bitmaps = [self._bitmap(image) for image in loaded]
            try:
                text = ffi.new("mtmd_input_text *")
                text_bytes = ffi.new("char[]", data)
                text.text, text.text_len = text_bytes, len(data)
                text.add_special, text.parse_special = False, bool(parse_special)
                chunks = C.mtmd_input_chunks_init()
                array = ffi.new("mtmd_bitmap *[]", bitmaps) if bitmaps else ffi.NULL
                with logs.capture() as messages:
                    rc = C.mtmd_tokenize(self._ptr, chunks, text, array, len(bitmaps))
                if rc != 0:
                    C.mtmd_input_chunks_free(chunks)
                    if rc == 2:
                        raise MalformedImageError(f"libmtmd could not preprocess an image: {reason(messages)}")
                    raise InvalidParameterError(f"libmtmd could not tokenize the prompt (code {rc}): "
                                                f"{reason(messages)}")
            finally:
                for bitmap in bitmaps:
                    C.mtmd_bitmap_free(bitmap)
            return self._prompt(chunks, loaded)

    def _bitmap(self, image: Image) -> CData:
        """Decode the image into an RGB bitmap (libmtmd's stb_image)."""
        opt = C.mtmd_helper_init_opt_default()
        with logs.capture() as messages:
            wrapper = C.mtmd_helper_bitmap_init_from_buf(self._ptr, image.data, len(image.data), False, opt)
        if wrapper.bitmap == ffi.NULL:
            raise MalformedImageError(f"the {image.format.upper()} image could not be decoded (damaged or truncated "
                                      f"data): {reason(messages)}")
        return wrapper.bitmap

    def _prompt(self, chunks: CData, images: list[Image]) -> ImagePrompt:
        """The ImagePrompt over libmtmd's chunk list (which it then owns)."""
        pieces: list[_Piece] = []
        tokens: list[int] = []
        n_tokens = ffi.new("size_t *")
        for i in range(C.mtmd_input_chunks_size(chunks)):
            chunk = C.mtmd_input_chunks_get(chunks, i)
            kind = C.mtmd_input_chunk_get_type(chunk)
            start = len(tokens)
            if kind == C.MTMD_INPUT_CHUNK_TYPE_TEXT:
                pointer = C.mtmd_input_chunk_get_tokens_text(chunk, n_tokens)
                text_tokens = list(pointer[0:n_tokens[0]])
                tokens += text_tokens
                pieces.append(_Piece(start, len(tokens), text_tokens, chunk))
            elif kind == C.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                # the chunk's id is its image's SHA-256 (set by the decoding helper); an image tiled into slices
                # (some models) comes as several chunks with the same id
                image_id = c_string(C.mtmd_input_chunk_get_id(chunk)) or "0"
                tokens += [_placeholder(image_id)] * C.mtmd_input_chunk_get_n_tokens(chunk)
                pieces.append(_Piece(start, len(tokens), None, chunk))
            else:
                C.mtmd_input_chunks_free(chunks)
                raise InvalidParameterError("the prompt produced an audio chunk: llmplace takes images only")
        if not pieces or pieces[-1].tokens is None or not pieces[-1].tokens:
            C.mtmd_input_chunks_free(chunks)
            raise InvalidParameterError("the prompt ends with an image: add text after it")
        return ImagePrompt(self, chunks, pieces, tokens, len(images))

    def _check_fits(self, piece: _Piece, context: Context) -> None:
        """llama.cpp aborts the process when an image decoded with non-causal attention (some models attend
        within an image both ways) does not fit one micro-batch."""
        n = piece.end - piece.start
        with self._lifetime:
            non_causal = bool(C.mtmd_decode_use_non_causal(self._ptr, piece.chunk))
        if non_causal and n > min(context.n_batch, context.n_ubatch):
            raise InvalidParameterError(
                f"this model attends within an image both ways, so an image's {n} tokens must fit one batch: "
                f"create the Context with n_batch and n_ubatch of at least {n} (they are {context.n_batch} and "
                f"{context.n_ubatch})")

    def _evaluate(self, chunk: CData, n_batch: int, context_ptr: CData, n_past: int) -> None:
        """Encode the image chunk and decode its embeddings into the context at n_past (Context.decode_media)."""
        new_n_past = ffi.new("llama_pos *", n_past)
        with self._lifetime, self._encoding:
            with logs.capture() as messages:
                rc = C.mtmd_helper_eval_chunk_single(self._ptr, context_ptr, chunk, n_past, 0, n_batch, False,
                                                     new_n_past)
        if rc == 2:
            raise AbortedError("computing the image was aborted (the context was closed or aborted)")
        if rc != 0:
            raise DecodeError(f"libmtmd could not compute the image (code {rc}): {reason(messages)}")


def _check_projector_file(path: Path) -> None:
    """A readable GGUF with a vision encoder, checked before libmtmd parses it (a text model's GGUF passed as
    the projector, or a damaged file, gets a message that says so)."""
    from . import gguf_validate

    if not path.is_file():
        raise ModelLoadError(f"no projector file at {path}: pass the mmproj GGUF that goes with the model")
    metadata = gguf_validate.read(path).metadata
    if metadata.get("general.architecture") != "clip":
        raise ModelLoadError(f"{path.name} is not a multimodal projector (its architecture is "
                             f"{metadata.get('general.architecture')!r}, not 'clip'): pass the model's mmproj file")
    if not metadata.get("clip.has_vision_encoder"):
        raise ModelLoadError(f"{path.name} has no vision encoder (clip.has_vision_encoder is not true): llmplace "
                             "takes images only")


def projector_memory(path: str | os.PathLike[str], *, device: str | None = None,
                     use_gpu: bool = True) -> dict[str, tuple[int, int]]:
    """What the projector at `path` would take in each memory ("host", or a device's name): (weights, compute
    buffers) in bytes, from libmtmd's own dry run (nothing is allocated). device / use_gpu: where its encoder goes,
    as for Projector. What estimate and fit add for mmproj=."""
    from .backends import ensure_initialized

    path = Path(path)
    _check_projector_file(path)
    from . import gguf_validate

    weights = sum(tensor.n_bytes for tensor in gguf_validate.read(path).tensors)
    ensure_initialized()
    logs.install()
    on_gpu, encoder = encoder_device(device, use_gpu)
    devices, sizes = ffi.new("void *[]", 16), ffi.new("size_t[]", 16)
    with logs.capture() as messages:
        n = C.llmplace_mtmd_memory_usage(os.fsencode(path), on_gpu, encoder, 1, 16, devices, sizes)
    if n < 0:
        raise ModelLoadError(f"libmtmd could not read the projector {path.name}: {reason(messages)}")
    usage: dict[str, int] = {}
    for i in range(min(n, 16)):
        device = ffi.cast("ggml_backend_dev_t", devices[i])
        on_host = C.ggml_backend_dev_type(device) != C.GGML_BACKEND_DEVICE_TYPE_GPU
        name = "host" if on_host else c_string(C.ggml_backend_dev_name(device))
        usage[name] = usage.get(name, 0) + int(sizes[i])
    # the weights are where most of the bytes are (one device: the encoder is not split); the rest is compute
    main = max(usage, key=lambda name: usage[name]) if usage else "host"
    return {name: ((min(weights, total), total - min(weights, total)) if name == main else (0, total))
            for name, total in usage.items()}


# ---- OpenAI-shaped messages with image_url content parts (the drop-in's chat handlers, Chat, the server) ----
def image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The URLs of the messages' image_url content parts, in order."""
    urls: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            urls += [_part_url(part) for part in content if isinstance(part, Mapping) and
                     part.get("type") == "image_url"]
    return urls


def _part_url(part: Mapping[str, Any]) -> str:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str):
        raise InvalidParameterError("an image_url content part needs 'image_url': {'url': <data: URL or path>}")
    return url


def with_markers(messages: Sequence[Mapping[str, Any]], marker: str) -> list[dict[str, Any]]:
    """The messages with list contents made text: text parts joined, each image_url part replaced by `marker`
    (other keys kept)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url":
                    _part_url(part)
                    pieces.append(marker)
                elif isinstance(part, Mapping) and part.get("type") == "text":
                    pieces.append(str(part.get("text", "")))
                elif isinstance(part, str):
                    pieces.append(part)
                else:
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise InvalidParameterError(f"a {kind!r} content part: llmplace takes text and image_url parts")
            content = "".join(pieces)
        out.append({**message, "content": "" if content is None else content})
    return out


def image_part(image: ImageSource) -> dict[str, Any]:
    """An OpenAI image_url content part holding the image as a data: URL (for a conversation's history)."""
    picture = load_image(image)
    data = base64.b64encode(picture.data).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/{picture.format};base64,{data}"}}


def require_projector(projector: Projector | None, n_images: int) -> Projector:
    """The projector to turn `n_images` images into embeddings; NoProjectorError when there is none."""
    if projector is None:
        raise NoProjectorError(f"the request has {n_images} image(s) but no projector (mmproj) is loaded for the "
                               "model: load one (Projector(model, 'mmproj.gguf'), Llama(..., chat_handler="
                               "MTMDChatHandler(clip_model_path=...)), or `llmplace serve --mmproj FILE`)")
    return projector
