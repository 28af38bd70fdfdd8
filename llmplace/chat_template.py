"""Chat templates: turn a list of messages into a model's prompt text, and that text into tokens.

Two engines render a template:
- Jinja2 (the default), running the Jinja source shipped in the GGUF (`tokenizer.chat_template`) the way
  Hugging Face's `apply_chat_template` does: a sandboxed environment with trim_blocks/lstrip_blocks, the
  loopcontrols extension, and the helpers templates call (`raise_exception`, `strftime_now`, `tojson`,
  `bos_token`, `eos_token`, `add_generation_prompt`). This runs the model's own template, whatever it is.
- llama.cpp's built-in engine (`llama_chat_apply_template`), which does not run Jinja: it recognises a known
  template family by substrings and formats the messages with hand-written C++. It is the fallback for
  template *names* we have no Jinja source for ("llama3", "mistral-v7", ...) and the reference the tests
  compare the Jinja output against.

Some GGUFs ship no template at all (the packaged Gemma 3 270M is one): for those a template is chosen by
architecture (`gemma*` → "gemma"); anything else must be given `template=`.

A template is a program from the model file, so it runs under limits as well as in Jinja's sandbox (which
stops escapes, not exhaustion): a time budget, bounded loops, ranges, repetition, formatting widths, numbers,
call depth and output size (llmplace/jinja_limits.py). A template that exceeds one, or fails in any other way,
raises TemplateError; it cannot hang the caller or raise MemoryError, RecursionError or OverflowError.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from . import jinja_limits
from ._ffi import C, ffi
from .errors import InvalidParameterError, TemplateError

if TYPE_CHECKING:
    from .model import Model

ROLES = ("system", "user", "assistant", "tool")

# Jinja sources for template names, written for llmplace to match llama.cpp's built-in formatting of the
# same name token for token (tests/test_chat.py checks this), so a model without a shipped template still
# gets the Jinja path (BOS in the text, raise_exception on malformed conversations).
BUILTIN_JINJA = {
    # ChatML, as llama.cpp's "chatml" formats it (no default system prompt).
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # Gemma (2 and 3): no system role, so a system message is folded into the first user turn; the
    # assistant's role is called "model"; contents are trimmed; turns must alternate user/model.
    "gemma": (
        "{{ bos_token }}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system_text = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system_text = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Gemma conversations must alternate user and assistant turns, starting with user') }}"
        "{%- endif -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' }}"
        "{%- if loop.first and system_text -%}{{ system_text + '\\n\\n' }}{%- endif -%}"
        "{{ (message['content'] | trim) + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
}

# Architectures whose GGUFs may lack a template, and the name to use for them.
DEFAULT_BY_ARCH = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


class _RaisedByTemplate(Exception):
    """raise_exception() inside a template (kept apart from Jinja's own errors)."""


def _raise_exception(message: str):
    raise _RaisedByTemplate(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would corrupt the JSON a template embeds
    # in a prompt (tool schemas): templates are written against this plain json.dumps behaviour.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _SyntaxProblem(TemplateError):
    """Python's Jinja cannot parse the template (llama.cpp's own engine reads a dialect of its own)."""


# A short conversation, as llama.cpp's chat layer renders a template with when it reads one (its capability
# probes) and at each turn.
_PROBE_MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


def check_for_native_engine(source: str) -> None:
    """TemplateError when `source` exceeds jinja_limits on a short conversation. llama.cpp's chat layer (tools,
    reasoning: chat_tools.ChatTemplates) runs templates in its C++ engine, which has no limits: a recursive macro
    overflowed its stack (a segfault), nested loops of 10^10 steps never returned. The template's own errors
    and syntax Python's Jinja does not read are left for llama.cpp to report."""
    try:
        compiled = _compile(source)
    except _SyntaxProblem:
        return
    try:
        jinja_limits.render(compiled, messages=_PROBE_MESSAGES, add_generation_prompt=True, bos_token="",
                            eos_token="", tools=None)
    except (jinja_limits.LimitExceeded, RecursionError, MemoryError) as exc:
        # RecursionError: values nested too deep for Python to print, which C++ prints by recursing as deep
        raise TemplateError(f"the chat template exceeded its limits: {exc}; llama.cpp's chat layer, which renders "
                            "it for tools and reasoning, has none (a runaway template would crash or hang the "
                            "process): pass another template=") from None
    except Exception:  # noqa: BLE001 - the template's own failures: llama.cpp reports them in its words
        return


@lru_cache(maxsize=32)
def _compile(source: str):
    """Compile Jinja source once per distinct template (a chat re-renders every turn)."""
    from jinja2.ext import loopcontrols

    if len(source) > jinja_limits.MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the chat template is {len(source)} characters long (the limit is "
                            f"{jinja_limits.MAX_TEMPLATE_CHARS}); pass template='chatml' (or another built-in name) "
                            "instead")
    import jinja2

    env = jinja_limits.environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = jinja_limits.limited_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise _SyntaxProblem(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message}); fix it, "
                             "or pass template='chatml' (or another built-in name) instead") from None
    except Exception as exc:  # noqa: BLE001 - nesting too deep for the parser or Python's compiler, ...
        raise TemplateError(f"the chat template could not be compiled ({type(exc).__name__}: {exc}); pass "
                            "template='chatml' (or another built-in name) instead") from None


def render_limited(template, **variables: Any) -> str:
    """Render a compiled template (from _compile) under jinja_limits' limits: the text, or TemplateError."""
    try:
        return jinja_limits.render(template, **variables)
    except _RaisedByTemplate as exc:
        raise TemplateError(f"the chat template refused these messages: {exc}") from None
    except jinja_limits.LimitExceeded as exc:
        raise TemplateError(f"the chat template exceeded its limits: {exc}; a chat template should only format "
                            "the messages (pass another template=)") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the template's code is the template's failure
        raise TemplateError(f"the chat template failed on these messages ({type(exc).__name__}: "
                            f"{str(exc)[:300]}); check the messages' roles and order, or pass another "
                            "template=") from None


def builtin_names() -> list[str]:
    """Template names llama.cpp's built-in engine knows ('chatml', 'gemma', 'llama3', ...)."""
    n = C.llama_chat_builtin_templates(ffi.NULL, 0)
    names = ffi.new("const char *[]", n)
    C.llama_chat_builtin_templates(names, n)
    return [ffi.string(name).decode() for name in names]


def _looks_like_name(template: str) -> bool:
    return "{" not in template and "\n" not in template and len(template) < 64


def check_message_list(messages) -> None:
    """Check the shape of a conversation: a list (a sequence other than text) of dicts (mappings). What
    their roles and contents must be is validate_messages' business (compat normalizes contents first)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidParameterError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, not "
                                    f"{type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError(f"message {i} must be a dict with 'role' and 'content', not {message!r}")


def validate_messages(messages, *, any_role: bool = False) -> list[dict[str, str]]:
    """Check a conversation and return it as plain {'role', 'content'} dicts (copies). Roles must be one of
    ROLES unless any_role (then any non-empty str: format_chat serves callers with roles of their own, such
    as OpenAI's old "function")."""
    check_message_list(messages)
    out = []
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            missing = "role" if "role" not in message else "content"
            raise InvalidParameterError(f"message {i} has no {missing!r}: every message needs both 'role' (one of "
                                        f"{', '.join(ROLES)}) and 'content' (a str), got {dict(message)!r}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role or (role not in ROLES and not any_role):
            raise InvalidParameterError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)} (a str)")
        if not isinstance(content, str):
            raise InvalidParameterError(f"message {i}'s content must be a str, not {type(content).__name__}; "
                                        "join multi-part content into one string first")
        out.append({"role": role, "content": content})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template for one model: how to render messages and tokenize the result.

    name: a template name ('chatml', 'gemma', ...) when one was given or chosen, else None (the GGUF's own).
    source: the Jinja source, or None when llama.cpp's built-in engine renders (`engine` says which).
    """

    name: str | None
    source: str | None
    engine: str                  # "jinja" or "llama.cpp"
    bos_token: str
    eos_token: str

    @classmethod
    def resolve(cls, model: "Model", template: str | None = None, *, engine: str = "jinja") -> "ChatTemplate":
        """The template for `model`: `template` (Jinja source or a name), else the GGUF's, else one chosen by
        architecture. engine="llama.cpp" forces llama.cpp's built-in engine."""
        if engine not in ("jinja", "llama.cpp"):
            raise InvalidParameterError(f"engine must be 'jinja' or 'llama.cpp', not {engine!r}")
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise TemplateError(f"template must be Jinja source or a template name such as 'chatml', "
                                f"not {template!r}")
        name = None
        if template is None:
            template = model.chat_template
            if template is None:
                name = DEFAULT_BY_ARCH.get(model.arch)
                if name is None:
                    raise TemplateError(
                        f"{model.path.name} ships no chat template and llmplace knows no default for its "
                        f"architecture {model.arch!r}; pass template= (Jinja source, or a name such as 'chatml')")
                template = name
        if _looks_like_name(template):
            name = template.strip()
            if name not in builtin_names():
                raise TemplateError(f"unknown chat template name {name!r}; use Jinja source or one of: "
                                    f"{', '.join(builtin_names())}")
        vocab = model.vocab
        bos = vocab.token_text(vocab.bos) if vocab.bos is not None else ""
        eos = vocab.token_text(vocab.eos) if vocab.eos is not None else ""
        if engine == "llama.cpp":
            return cls(name, None if name else template, "llama.cpp", bos, eos)
        if name is not None:
            source = BUILTIN_JINJA.get(name)
            if source is None:  # a name llama.cpp knows and we have no Jinja for: its engine renders it
                return cls(name, None, "llama.cpp", bos, eos)
            template = source
        _compile(template)  # a syntax error raises now, not at the first message
        return cls(name, template, "jinja", bos, eos)

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (already validated)."""
        if self.engine == "llama.cpp":
            builtin = self.name or self.source
            assert builtin is not None  # resolve gives llama.cpp's engine a name or a source
            return _apply_builtin(builtin, messages, add_generation_prompt)
        return render_limited(_compile(self.source), messages=list(messages),
                              add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                              eos_token=self.eos_token)

    def tokens(self, model: "Model", text: str) -> list[int]:
        """Tokens of rendered prompt text, with BOS added exactly once.

        Templates written for Hugging Face put `bos_token` in the text themselves (Gemma's does); llama.cpp's
        engine never does. So BOS is added only when the model wants one and the text does not start with it.
        Special-token text ('<|im_start|>') is parsed into its tokens. EOS is never appended (add_special=True
        would, for models that ask for it, and end the conversation before the reply).
        """
        vocab = model.vocab
        tokens = vocab.tokenize(text, add_special=False, parse_special=True)
        if vocab.add_bos and vocab.bos is not None and not (self.bos_token and text.startswith(self.bos_token)):
            tokens.insert(0, vocab.bos)
        return tokens


def _apply_builtin(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Render with llama.cpp's built-in engine (`llama_chat_apply_template`)."""
    keep = []  # the C strings must outlive the call
    chat = ffi.new("llama_chat_message[]", max(1, len(messages)))
    for i, message in enumerate(messages):
        keep += [ffi.new("char[]", message["role"].encode()), ffi.new("char[]", message["content"].encode())]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    tmpl = ffi.new("char[]", template.encode())
    size = 2 * sum(len(m["content"].encode()) for m in messages) + 1024
    for _ in range(2):
        buf = ffi.new("char[]", size)
        n = C.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, size)
        if n < 0:
            raise TemplateError("llama.cpp's built-in engine does not recognise this chat template; use the Jinja "
                                "engine (the default), or pass template='chatml' (or another built-in name)")
        if n <= size:
            return ffi.unpack(buf, n).decode("utf-8", errors="replace")
        size = n + 1
    raise TemplateError("the chat template produced a prompt of unstable length")  # pragma: no cover


def format_chat(model: "Model", messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                template: str | None = None, engine: str = "jinja") -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]).

    template: Jinja source or a name ('chatml', 'gemma', 'llama3', ...); default the model's own.
    engine: "jinja" (default: runs the template itself) or "llama.cpp" (its built-in engine).
    The text may begin with the BOS token's text (when the template writes `bos_token`): tokenize it with
    add_special=False, or use `ChatTemplate.tokens`, so BOS is not doubled.
    """
    chat_template = ChatTemplate.resolve(model, template, engine=engine)
    messages = validate_messages(messages, any_role=True)
    return chat_template.render(messages, add_generation_prompt=add_generation_prompt)
