"""llama-cpp-python's multimodal chat handlers over llmplace.images: `MTMDChatHandler(clip_model_path=...)`, the
generic one (since llama-cpp-python 0.3.26), which renders with the model's own chat template, `Llava15ChatHandler`
(LLaVA-1.5's prompt format) and `Gemma4ChatHandler`.

    llama = Llama("text.gguf", chat_handler=MTMDChatHandler(clip_model_path="mmproj.gguf"), n_ctx=2048)
    llama.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in this image?"}]}])

A user message's `image_url` parts (a data: URL, a local file path or file:// URL; an http(s) URL only when the
handler was made with allow_fetch=True) become the projector's marker where they stand, the messages are
rendered, and the prompt (text and images, llmplace.images.ImagePrompt) is completed by Llama.create_completion,
which computes the images into the Llama's context through the projector. Differences from upstream: http(s)
images are not fetched unless allowed; a bad image raises a typed error (MalformedImageError,
UnsupportedImageFormatError: ValueErrors, as upstream's); `tools` with tool_choice "auto" are not parsed from the
reply (a forced tool_choice and response_format work).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

from ..chat import format_chat
from ..chat_template import check_message_list
from ..images import Projector, image_urls, load_image, with_markers
from . import _chat

if TYPE_CHECKING:
    from .llama import Llama


def marked_messages(messages, marker: str) -> list[dict[str, Any]]:
    """{'role', 'content': str} messages: text parts joined, each image_url part replaced by `marker`."""
    check_message_list(messages)
    return [{"role": m.get("role"), "content": m["content"]} for m in with_markers(messages, marker)]


class MTMDChatHandler:
    """Chat with images through a projector (mmproj GGUF): the model's own chat template renders the messages,
    each image_url part standing where it is. allow_fetch: fetch http(s) image URLs (off by default)."""

    def __init__(self, clip_model_path: str, verbose: bool = True, use_gpu: bool = True, *,
                 allow_fetch: bool = False) -> None:
        if not os.path.exists(clip_model_path):
            raise ValueError(f"Clip model path does not exist: {clip_model_path}")
        self.clip_model_path = clip_model_path
        self.verbose, self.use_gpu, self.allow_fetch = verbose, use_gpu, allow_fetch
        # the projector of each Llama this handler served (loaded at its first call, closed with its model)
        self._projectors: weakref.WeakKeyDictionary[Any, Projector] = weakref.WeakKeyDictionary()

    def projector(self, llama: Llama) -> Projector:
        """The projector loaded for this Llama's model (at the first call)."""
        projector = self._projectors.get(llama._model)
        if projector is None or projector.closed:
            projector = Projector(llama._model, self.clip_model_path, n_threads=llama.n_threads,
                                  use_gpu=self.use_gpu)
            self._projectors[llama._model] = projector
        return projector

    def load_image(self, image_url: str) -> bytes:
        """The bytes of the image at image_url (data: URL, path, file:// URL; http(s) when allow_fetch)."""
        return load_image(image_url, allow_fetch=self.allow_fetch).data

    @staticmethod
    def _load_image(image_url: str) -> bytes:
        return load_image(image_url).data

    @staticmethod
    def get_image_urls(messages) -> list[str]:
        return image_urls(messages)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None, local_dir: str | os.PathLike[str] | None = None,
                        local_dir_use_symlinks: bool | str = "auto", cache_dir: str | os.PathLike[str] | None = None,
                        **kwargs: Any) -> MTMDChatHandler:
        """Download the projector file from the Hugging Face Hub (huggingface_hub) and make a handler for it."""
        from ._hub import download

        if filename is None:
            raise ValueError("from_pretrained needs filename= (a glob naming the projector file)")
        path = download(repo_id, filename, local_dir=local_dir, cache_dir=cache_dir)
        return cls(clip_model_path=str(path), **kwargs)

    def _render(self, llama: Llama, messages: list[dict[str, Any]], marker: str) -> str:
        return format_chat(llama._model, marked_messages(messages, marker), add_generation_prompt=True)

    def __call__(self, *, llama: Llama, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                 temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                 typical_p: float = 1.0, stream: bool = False, stop=[], seed=None,  # noqa: B006 - as upstream
                 response_format=None, max_tokens=None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repeat_penalty: float = 1.1, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model=None,
                 logits_processor=None, grammar=None, logit_bias=None, logprobs=None, top_logprobs=None,
                 **kwargs: Any):
        urls = image_urls(messages)
        if not urls and type(self)._render is MTMDChatHandler._render:
            # no image: the Llama's own chat path (the same template, and its tools and reasoning parsing)
            return _chat.create(llama, messages=messages, functions=functions, function_call=function_call,
                                tools=tools, tool_choice=tool_choice, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, typical_p=typical_p, stream=stream, stop=stop, seed=seed,
                                response_format=response_format, max_tokens=max_tokens,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                                mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
                                logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias,
                                logprobs=logprobs, top_logprobs=top_logprobs)
        projector = self.projector(llama)
        pictures = [load_image(url, allow_fetch=self.allow_fetch) for url in urls]  # checked before rendering
        text = self._render(llama, messages, projector.marker)
        vocab = llama._model.vocab
        # BOS unless the template wrote it (templates written for Hugging Face do)
        wrote_bos = vocab.bos is not None and text.startswith(vocab.token_text(vocab.bos))
        prompt = projector.tokenize(text, pictures, add_special=not wrote_bos)
        grammar = _chat.json_grammar(response_format, grammar)
        tool = _chat.forced_tool(functions, function_call, tools, tool_choice)
        if tool is not None:
            grammar = _chat.tool_grammar(tool)
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if vocab.eos is not None:
            stops.append(vocab.token_text(vocab.eos))  # as the text-only chat path
        completion = llama.create_completion(
            prompt=prompt, temperature=temperature, top_p=top_p, top_k=top_k,  # type: ignore[arg-type]
            min_p=min_p, typical_p=typical_p, logprobs=top_logprobs if logprobs else None, stream=stream, stop=stops,
            seed=seed, max_tokens=max_tokens, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta, model=model, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
        return _chat.reshape(completion, stream, tool)


class Gemma4ChatHandler(MTMDChatHandler):
    """MTMDChatHandler for Gemma 4 (upstream's name for the same generic handler)."""


class Llava15ChatHandler(MTMDChatHandler):
    """LLaVA-1.5's prompt format ("USER: <image>...\\nASSISTANT:") with its default system message, whatever
    template the model file carries (LLaVA-1.5 GGUFs carry none)."""

    DEFAULT_SYSTEM_MESSAGE: str | None = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.")
    # Written for llmplace from LLaVA-1.5's conversation format: the system text, then per user turn its images
    # first and its text after them, per assistant turn its text.
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}{{ message.content }}{% endif %}"
        "{% if message.role == 'user' %}\nUSER: "
        "{% if message.content is string %}{{ message.content }}{% else %}"
        "{% for part in message.content if part.type == 'image_url' %}{{ marker }}{% endfor %}"
        "{% for part in message.content if part.type == 'text' %}{{ part.text }}{% endfor %}"
        "{% endif %}{% endif %}"
        "{% if message.role == 'assistant' and message.content is not none %}\nASSISTANT: {{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}\nASSISTANT: {% endif %}")

    def __init__(self, clip_model_path: str, verbose: bool = True, *, allow_fetch: bool = False) -> None:
        super().__init__(clip_model_path, verbose, allow_fetch=allow_fetch)

    @staticmethod
    def split_text_on_image_urls(text: str, image_urls: list[str]) -> list[tuple[str, str]]:
        """[("text", ...), ("image_url", url) ...]: `text` cut at the first occurrence of each URL (upstream keeps
        it for code written against its older handlers)."""
        parts: list[tuple[str, str]] = []
        rest = text
        while rest:
            found = [(rest.find(url), url) for url in image_urls if url and rest.find(url) != -1]
            if not found:
                parts.append(("text", rest))
                break
            pos, url = min(found)
            if pos > 0:
                parts.append(("text", rest[:pos]))
            parts.append(("image_url", url))
            rest = rest[pos + len(url):]
        return parts

    def _render(self, llama: Llama, messages: list[dict[str, Any]], marker: str) -> str:
        from .. import jinja_limits

        messages = list(messages)
        if self.DEFAULT_SYSTEM_MESSAGE is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.DEFAULT_SYSTEM_MESSAGE}, *messages]
        check_message_list(messages)
        environment = jinja_limits.environment(trim_blocks=True, lstrip_blocks=True)
        return jinja_limits.render(environment.from_string(self.CHAT_FORMAT), messages=messages, marker=marker,
                                   add_generation_prompt=True)
