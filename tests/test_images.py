"""Images through a projector (llmplace.images, libmtmd): loading and checking images, tokenizing prompts with image
markers, generation that sees the image, equality with llama.cpp's own llama-mtmd-cli, and every bad input typed.

The vision model is a tiny random-weight LLaVA-1.5 pair written by llmplace.synthetic_vision (a llama text model and
a CLIP + MLP projector): it loads and encodes an image in milliseconds. PNGs are written here with zlib + struct."""

from __future__ import annotations

import base64
import struct
import subprocess
import zlib

import models
import pytest

import llmplace
from llmplace import gguf_validate, images, synthetic_vision
from llmplace.errors import (ContextOverflowError, ImageError, InvalidParameterError, MalformedImageError,
                             ModelLoadError, NoProjectorError, UnsupportedImageFormatError)


def png(width: int, height: int, pixel=lambda x, y: (x * 40 % 256, y * 60 % 256, (x + y) * 25 % 256)) -> bytes:
    """An 8-bit RGB PNG whose pixel (x, y) is pixel(x, y)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in pixel(x, y)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


RED = png(20, 12, lambda x, y: (255, 0, 0))
PATTERN = png(16, 16)


@pytest.fixture(scope="module")
def vision_files(model_cache):
    folder = model_cache / "vision"
    text, projector = folder / "text.gguf", folder / "mmproj.gguf"
    if not projector.exists():
        synthetic_vision.write_vision_model(folder, tokenizer_from=models.tokenizer_source(), seed=3)
    return text, projector


@pytest.fixture(scope="module")
def vision(vision_files):
    text, mmproj = vision_files
    with llmplace.load(text, progress=False) as model:
        projector = images.Projector(model, mmproj, n_threads=2)
        yield model, projector


def chat_prompt(model, user_text: str) -> str:
    """The user turn rendered with the model's chat template (SmolLM2's ChatML), as llama-mtmd-cli renders it."""
    return llmplace.format_chat(model, [{"role": "user", "content": user_text}], add_generation_prompt=True)


# ---- reading images ----
def test_png_jpeg_gif_bmp_headers_give_format_and_size(tmp_path):
    image = images.load_image(RED)
    assert (image.format, image.width, image.height) == ("png", 20, 12)
    jpeg = b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + b"\xff\xc0" + struct.pack(
        ">HBHHB", 17, 8, 30, 40, 3) + b"\x00" * 9
    assert (images.image_from_bytes(jpeg).width, images.image_from_bytes(jpeg).height) == (40, 30)
    assert images.image_from_bytes(b"GIF89a" + struct.pack("<HH", 7, 5) + b"\x00" * 8).width == 7
    bmp = b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 9, -4) + b"\x00" * 30
    assert (images.image_from_bytes(bmp).width, images.image_from_bytes(bmp).height) == (9, 4)


def test_image_from_path_file_url_and_data_url(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    data_url = "data:image/png;base64," + base64.b64encode(RED).decode()
    for source in (path, str(path), path.as_uri(), data_url):
        assert images.load_image(source).data == RED


def test_web_address_is_refused_unless_fetching_is_allowed():
    with pytest.raises(ImageError, match="fetching is off"):
        images.load_image("https://example.invalid/cat.png")


@pytest.mark.parametrize("data, kind", [
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WebP"),
    (b"II*\x00" + b"\x00" * 20, "TIFF"),
    (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, "AVIF"),
    (b"hello, world: not an image", "not an image"),
])
def test_unsupported_formats_are_named(data, kind):
    with pytest.raises(UnsupportedImageFormatError, match=kind):
        images.load_image(data)


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (RED[:20], "truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 4 + b"IHDR" + struct.pack(">II", 0, 5) + b"\x00" * 9, "0x5"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 4 + b"IHDR" + struct.pack(">II", 100000, 100000) + b"\x00" * 9, "larger"),
    ("data:image/png;base64,***", "base64"),
    ("data:image/png,abc", "not base64"),
])
def test_malformed_images_are_refused_before_decoding(data, why):
    with pytest.raises(MalformedImageError, match=why):
        images.load_image(data)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="could not read"):
        images.load_image(tmp_path / "missing.png")


# ---- the projector ----
def test_projector_loads_and_tokenizes_an_image_into_its_patches(vision):
    model, projector = vision
    assert projector.supports_vision and not projector.supports_audio
    prompt = projector.tokenize(f"Look: {projector.marker}\nWhat is it?", [RED])
    n_patches = synthetic_vision.TINY_CLIP.n_patches
    placeholders = [t for t in prompt.tokens if t < 0]
    assert len(placeholders) == n_patches and len(set(placeholders)) == 1
    text = [t for t in prompt.tokens if t >= 0]
    assert text == model.tokenize("Look: ", parse_special=True) + model.tokenize(
        "\nWhat is it?", add_special=False, parse_special=True)
    other = projector.tokenize(f"Look: {projector.marker}\nWhat is it?", [PATTERN])
    assert [t for t in other.tokens if t < 0] != placeholders  # another image, another placeholder


def test_generation_sees_the_image(vision):
    model, projector = vision
    text = chat_prompt(model, f"{projector.marker}Describe the picture.")
    logits = []
    for picture in (RED, PATTERN):
        with llmplace.Context(model, n_ctx=256) as context:
            images_prompt = projector.tokenize(text, [picture])
            images_prompt.prefill(context)
            logits.append(context.logits())
    assert not (logits[0] == logits[1]).all()
    first = llmplace.generate(model, projector.tokenize(text, [RED]), max_tokens=8, temperature=0)
    again = llmplace.generate(model, projector.tokenize(text, [RED]), max_tokens=8, temperature=0)
    assert first.tokens == again.tokens and len(first.tokens) >= 1


def test_a_second_request_reuses_the_cached_image(vision):
    model, projector = vision
    text = chat_prompt(model, f"{projector.marker}Describe the picture.")
    with llmplace.Context(model, n_ctx=256) as context:
        one = list(llmplace.stream_generate(model, projector.tokenize(text, [RED]), max_tokens=4, temperature=0,
                                            context=context))
        two = list(llmplace.stream_generate(model, projector.tokenize(text, [RED]), max_tokens=4, temperature=0,
                                            context=context))
        three = list(llmplace.stream_generate(model, projector.tokenize(text, [PATTERN]), max_tokens=4,
                                              temperature=0, context=context))
    assert [s.token for s in one] == [s.token for s in two]
    n_prompt = one[0].prompt_tokens
    assert two[0].prompt_cached == n_prompt - 1  # all but the last token, whose logits are recomputed
    assert three[0].prompt_cached < n_prompt - 1 - synthetic_vision.TINY_CLIP.n_patches  # the image differs


def test_marker_count_must_match_the_images(vision):
    model, projector = vision
    with pytest.raises(InvalidParameterError, match="1 image marker"):
        projector.tokenize(f"{projector.marker}?", [])
    with pytest.raises(InvalidParameterError, match="2 image marker"):
        projector.tokenize(f"{projector.marker}{projector.marker}x", [RED])


def test_a_prompt_ending_with_an_image_is_refused(vision):
    _, projector = vision
    with pytest.raises(InvalidParameterError, match="ends with an image"):
        projector.tokenize(f"Look: {projector.marker}", [RED])


def test_a_png_with_a_damaged_body_is_malformed(vision):
    _, projector = vision
    damaged = RED[:41] + b"\xff" * 8 + RED[49:]  # IDAT's compressed rows overwritten
    with pytest.raises(MalformedImageError, match="could not be decoded"):
        projector.tokenize(f"{projector.marker}x", [damaged])


def test_an_image_larger_than_the_context_overflows(vision):
    model, projector = vision
    with llmplace.Context(model, n_ctx=256) as context:  # llama.cpp's smallest context
        n_images = context.n_ctx // synthetic_vision.TINY_CLIP.n_patches + 1
        prompt = projector.tokenize(f"{projector.marker}x" * n_images, [RED] * n_images)
        with pytest.raises(ContextOverflowError):
            prompt.prefill(context)
        assert context.tokens == []
        # an image that does not fit after what the context holds: refused before it is computed
        context.decode(model.tokenize("word " * (context.n_ctx - 8)))
        held = list(context.tokens)
        called = []
        with pytest.raises(ContextOverflowError, match="an image of 16 tokens"):
            context.decode_media([-7] * 16, lambda pointer, n_past: called.append(n_past))
        assert context.tokens == held and not called


def test_speculation_refuses_a_prompt_with_images(vision):
    model, projector = vision
    with pytest.raises(InvalidParameterError, match="speculative"):
        llmplace.generate(model, projector.tokenize(f"{projector.marker}x", [RED]), lookup=True, max_tokens=2)


def test_a_text_model_is_not_a_projector(vision, vision_files):
    model, _ = vision
    text, _ = vision_files
    with pytest.raises(ModelLoadError, match="not a multimodal projector"):
        images.Projector(model, text)
    with pytest.raises(ModelLoadError, match="no projector file"):
        images.Projector(model, text.parent / "missing.gguf")


def test_an_image_without_a_projector_is_a_typed_error():
    with pytest.raises(NoProjectorError, match="no projector"):
        images.require_projector(None, 1)


def test_closing_the_model_closes_its_projector(vision_files):
    text, mmproj = vision_files
    model = llmplace.load(text, progress=False)
    projector = images.Projector(model, mmproj, n_threads=1, warmup=False)
    model.close()
    assert projector.closed


# ---- equality with llama.cpp's own tool ----
QUESTION, N_PREDICT = "What is in this picture?", 16


@pytest.fixture(scope="module")
def mtmd_cli_reply(vision_files, tmp_path_factory) -> str:
    """What llama-mtmd-cli, built from the same source, replies greedily to PATTERN and QUESTION: it renders the
    user turn with the model's template and puts the image before the question (its marker goes first when the
    prompt has none)."""
    from llmplace._ffi import BIN_DIR, LIB_DIR

    text_path, mmproj = vision_files
    picture = tmp_path_factory.mktemp("cli") / "pattern.png"
    picture.write_bytes(PATTERN)
    out = subprocess.run(
        [str(BIN_DIR / "llama-mtmd-cli"), "-m", str(text_path), "--mmproj", str(mmproj), "--image", str(picture),
         "-p", QUESTION, "-n", str(N_PREDICT), "--temp", "0", "-t", "2", "-c", "512", "--no-warmup",
         "--jinja"],  # the model's Jinja template, as llmplace renders it (else its built-in ChatML, no system turn)
        capture_output=True, timeout=600, cwd=LIB_DIR)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return out.stdout.decode("utf-8", errors="replace").strip("\n")


def test_greedy_tokens_equal_llama_mtmd_cli(vision, mtmd_cli_reply, tmp_path):
    model, projector = vision
    picture = tmp_path / "pattern.png"
    picture.write_bytes(PATTERN)
    prompt = projector.tokenize(chat_prompt(model, projector.marker + QUESTION), [picture])
    with llmplace.Context(model, n_ctx=512, n_threads=2) as context:
        ours = llmplace.generate(model, prompt, max_tokens=N_PREDICT, temperature=0, context=context)
    assert len(ours.tokens) == N_PREDICT and ours.text.strip("\n") == mtmd_cli_reply


# ---- the drop-in: llama-cpp-python's MTMD chat handler ----
IMAGE_MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PATTERN).decode()}},
    {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def vision_llama(vision_files):
    from llmplace.compat.llama_chat_format import MTMDChatHandler

    text, mmproj = vision_files
    with llmplace.Llama(str(text), chat_handler=MTMDChatHandler(clip_model_path=str(mmproj)), n_ctx=512,
                        n_threads=2, verbose=False) as llama:
        yield llama


def test_chat_handler_reply_equals_llama_mtmd_cli(vision_llama, mtmd_cli_reply):
    reply = vision_llama.create_chat_completion(IMAGE_MESSAGES, temperature=0, max_tokens=N_PREDICT)
    assert reply["choices"][0]["message"]["content"].strip("\n") == mtmd_cli_reply
    assert reply["usage"]["prompt_tokens"] > synthetic_vision.TINY_CLIP.n_patches
    chunks = vision_llama.create_chat_completion(IMAGE_MESSAGES, temperature=0, max_tokens=N_PREDICT, stream=True)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed.strip("\n") == mtmd_cli_reply


def test_chat_handler_reads_image_files_and_refuses_bad_images(vision_llama, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    for url in (str(path), path.as_uri()):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": url},
                                                 {"type": "text", "text": "Colour?"}]}]
        assert vision_llama.create_chat_completion(messages, temperature=0, max_tokens=2)["choices"]
    for data, error in ((RED[:20], MalformedImageError), (b"RIFF\0\0\0\0WEBPVP8 ", UnsupportedImageFormatError)):
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": "?"}]}]
        with pytest.raises(error):
            vision_llama.create_chat_completion(bad, max_tokens=2)
    web = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    with pytest.raises(ImageError, match="fetching is off"):
        vision_llama.create_chat_completion(web, max_tokens=2)


def test_chat_handler_without_images_is_the_plain_chat(vision_llama, vision_files):
    text, _ = vision_files
    messages = [{"role": "user", "content": "Hello"}]
    with llmplace.Llama(str(text), n_ctx=512, n_threads=2, verbose=False) as plain:
        expected = plain.create_chat_completion(messages, temperature=0, max_tokens=6)
    reply = vision_llama.create_chat_completion(messages, temperature=0, max_tokens=6)
    assert reply["choices"][0]["message"] == expected["choices"][0]["message"]


def test_an_image_part_without_a_chat_handler_raises_no_projector_error(vision_files):
    text, _ = vision_files
    with llmplace.Llama(str(text), n_ctx=512, n_threads=1, verbose=False) as plain:
        with pytest.raises(NoProjectorError, match="MTMDChatHandler"):
            plain.create_chat_completion(IMAGE_MESSAGES, max_tokens=2)


# ---- the server ----
def _post(port: int, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_answers_image_parts_and_refuses_bad_images_with_400(vision_files, mtmd_cli_reply):
    import sys
    import tempfile

    from processes import free_port, stop, wait_until_serving

    text, mmproj = vision_files
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "serve", str(text), "--mmproj", str(mmproj),
                                "--port", str(port), "--threads", "2", "--n-ctx", "512"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    try:
        wait_until_serving(process, port)
        status, reply = _post(port, {"messages": IMAGE_MESSAGES, "temperature": 0, "max_tokens": N_PREDICT})
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"].strip("\n") == mtmd_cli_reply
        # a chat without images goes to the batching engine, as on a server without --mmproj
        status, reply = _post(port, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply
        for data, words in ((RED[:20], "truncated"), (b"II*\0" + b"\0" * 16, "TIFF")):
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            status, error = _post(port, {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]})
            assert status == 400 and words in error["error"]["message"], error
            assert error["error"]["type"] == "invalid_request_error"
        status, error = _post(port, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://127.0.0.1:9/x.png"}}, {"type": "text", "text": "?"}]}]})
        assert status == 400 and "fetching is off" in error["error"]["message"]
    finally:
        stop(process)


# ---- memory: estimate and fit count the projector ----
def test_estimate_and_fit_count_the_projector(vision_files):
    text, mmproj = vision_files
    need = images.projector_memory(mmproj, device="CPU")
    assert set(need) == {"host"}
    weights, compute = need["host"]
    assert weights == sum(t.n_bytes for t in gguf_validate.read(mmproj).tensors)
    assert compute > 0  # the encoder's compute buffer, from libmtmd's dry run
    plain = llmplace.estimate(text, n_ctx=512)
    with_projector = llmplace.estimate(text, n_ctx=512, mmproj=mmproj, mmproj_device="CPU")
    assert with_projector["host"].weights - plain["host"].weights == weights
    assert with_projector["host"].compute - plain["host"].compute == compute
    fitted = llmplace.fit(text, n_ctx=512, mmproj=mmproj, mmproj_device="CPU")
    assert fitted.success and fitted.estimate["host"].total == with_projector["host"].total


def test_the_image_encoder_goes_to_the_device_asked_for(vision_files, rpc_devices):
    """Placement reaches the vision tower: its weights and compute go to the named device (an RPC device here,
    DESIGN §7), the memory estimate says so, and the image gives the same logits as on the CPU."""
    text, mmproj = vision_files
    device = rpc_devices[0].name
    need = images.projector_memory(mmproj, device=device)
    assert need[device][0] > 0 and need.get("host", (0, 0))[0] == 0
    planned = llmplace.estimate(text, n_ctx=256, n_gpu_layers=0, mmproj=mmproj, mmproj_device=device)
    assert planned[device].weights >= need[device][0]
    with pytest.raises(llmplace.DeviceNotFoundError):
        images.projector_memory(mmproj, device="NoSuchDevice0")
    logits = {}
    with llmplace.load(text, n_gpu_layers=0, progress=False) as model:
        prompt_text = chat_prompt(model, "<__media__>Describe the picture.")
        for where in ("CPU", device):
            with images.Projector(model, mmproj, device=where, n_threads=1) as projector, \
                    llmplace.Context(model, n_ctx=256, n_threads=1) as context:
                projector.tokenize(prompt_text, [PATTERN]).prefill(context)
                logits[where] = context.logits()
    assert abs(logits["CPU"] - logits[device]).max() < 1e-3


def test_one_projector_serves_contexts_in_several_threads(vision):
    """The encoder's output lives in the projector (libmtmd's context): images computed for contexts in other
    threads take turns, and each context gets its own image."""
    import threading

    model, projector = vision
    text = chat_prompt(model, f"{projector.marker}Describe the picture.")
    expected = {}
    for name, picture in (("red", RED), ("pattern", PATTERN)):
        with llmplace.Context(model, n_ctx=256, n_threads=1) as context:
            projector.tokenize(text, [picture]).prefill(context)
            expected[name] = context.logits()
    results, errors = {}, []

    def run(name: str, picture: bytes) -> None:
        try:
            for _ in range(3):
                with llmplace.Context(model, n_ctx=256, n_threads=1) as context:
                    projector.tokenize(text, [picture]).prefill(context)
                    results.setdefault(name, []).append(context.logits())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in (("red", RED), ("pattern", PATTERN))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name, rows in results.items():
        assert all((row == expected[name]).all() for row in rows), name


@pytest.mark.gpu
def test_the_image_encoder_on_the_gpu_agrees_with_the_cpu(vision_files):
    """On the GPU machine (skipped without a GPU backend, as tests/test_gpu.py): the encoder and its memory on
    the first GPU, the image's logits close to the CPU's (the kernels differ, so not bit for bit)."""
    gpus = [d for d in llmplace.devices() if d.kind == "gpu"]
    if not gpus:
        pytest.skip("no GPU backend on this machine (install a GPU plugin build)")
    text, mmproj = vision_files
    need = images.projector_memory(mmproj)  # default: the first GPU
    assert need[gpus[0].name][0] > 0
    logits = {}
    with llmplace.load(text, n_gpu_layers=0, progress=False) as model:
        prompt_text = chat_prompt(model, "<__media__>Describe the picture.")
        for where in ("CPU", gpus[0].name):
            with images.Projector(model, mmproj, device=where) as projector, \
                    llmplace.Context(model, n_ctx=256) as context:
                projector.tokenize(prompt_text, [PATTERN]).prefill(context)
                logits[where] = context.logits()
    assert abs(logits["CPU"] - logits[gpus[0].name]).max() < 0.05


# ---- Chat ----
def test_chat_takes_images_and_keeps_them_in_its_history(vision_files, mtmd_cli_reply):
    text, mmproj = vision_files
    with llmplace.Chat(str(text), projector=str(mmproj), n_ctx=512, n_threads=2, max_tokens=N_PREDICT,
                       temperature=0) as chat:
        reply = chat.submit(QUESTION, images=[PATTERN])
        assert reply.text.strip("\n") == mtmd_cli_reply  # the same prompt as llama-mtmd-cli's, so the same reply
        user = chat.history[-2]
        assert user["content"][0]["type"] == "image_url" and user["content"][-1] == {"type": "text",
                                                                                     "text": QUESTION}
        n_cached = chat.n_cached
        chat.submit("And now?", max_tokens=2)  # the image stays in the conversation: its prefix is reused
        assert chat.last.prompt_tokens > n_cached
        assert chat.last_prompt_evaluated < chat.last.prompt_tokens - synthetic_vision.TINY_CLIP.n_patches
    with llmplace.Chat(str(text), n_ctx=512, n_threads=1) as chat:
        with pytest.raises(NoProjectorError, match="no projector"):
            chat.submit("What is this?", images=[RED])
