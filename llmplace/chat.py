"""Chat prompts: turn a list of messages into the model's prompt with its chat template.

This first version renders with llama.cpp's built-in template engine (`llama_chat_apply_template`),
which recognises the common template families (ChatML, Llama 3, Gemma ...) from the GGUF's template.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ._ffi import C, ffi
from .errors import InvalidParameterError
from .model import Model


def format_chat(model: Model, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                template: str | None = None) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...])."""
    template = template or model.chat_template
    if not template:
        raise InvalidParameterError(
            f"{model.path.name} has no chat template; pass template= (a template name such as 'chatml', "
            "or Jinja source) or build the prompt yourself")
    keep = []  # the C strings must outlive the call
    chat = ffi.new("llama_chat_message[]", len(messages))
    for i, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError):
            raise InvalidParameterError(f"message {i} must be a mapping with 'role' and 'content', got {message!r}") from None
        keep += [ffi.new("char[]", str(role).encode()), ffi.new("char[]", str(content).encode())]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    tmpl = ffi.new("char[]", template.encode())
    size = 2 * sum(len(str(m["content"])) for m in messages) + 1024
    for _ in range(2):
        buf = ffi.new("char[]", size)
        n = C.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, size)
        if n < 0:
            raise InvalidParameterError(
                "llama.cpp does not recognise this chat template; pass template='chatml' (or another built-in "
                "name) or build the prompt yourself")
        if n <= size:
            return ffi.unpack(buf, n).decode("utf-8", errors="replace")
        size = n + 1
    raise InvalidParameterError("the chat template produced a prompt of unstable length")
