"""What of llama-cpp-python 0.3.36's public surface llmplace.compat leaves out, and why: the one list.

tests/test_compat_surface.py walks every public module llama-cpp-python ships (`llama_cpp`, `llama_cpp.llama`,
`llama_types`, `llama_grammar`, `llama_cache`, `llama_chat_format`, `llama_speculative`, `llama_tokenizer`, the
raw `llama_cpp.llama_cpp` C API, `llava_cpp`, `mtmd_cpp`, `llama_cpp_ext`, `server.*`), each public name, the
public members of its classes and the parameters of its callables, and fails for anything llmplace.compat
neither provides (at the same module path after `install()`'s aliasing, `_install.ALIASES`) nor lists here.

Keys (fnmatch patterns allowed, for the raw bindings):
- "llama_cpp.<module>.<name>": a module-level name, as upstream's module that defines it names it; leaving
  out the definition also leaves out its re-exports (`llama_cpp.llama_cpp.llama_free` covers
  `llama_cpp.llama_free`);
- "llama_cpp.<module>": a whole module;
- "llama_cpp.<module>.<Class>.<member>": a member of a class llmplace provides;
- "llama_cpp.<module>.<callable>(<parameter>)": a parameter whose kind, name or default differs.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

_RAW_C_API = (
    "llama-cpp-python's ctypes binding of llama.h: functions that take and return raw pointers, ctypes structs, "
    "pointer and callback types. llmplace binds llama.cpp with cffi and its classes own every native handle, so "
    "ctypes objects could not be passed to it; use Llama, llmplace.Model / Context / generate. The enum and "
    "#define constants and llama_supports_* / llama_max_devices / llama_print_system_info / llama_time_us are "
    "provided (llmplace/compat/llama_cpp.py)")
_IMAGES = ("images are taken through MTMDChatHandler (the model's own chat template), Llava15ChatHandler and "
           "Gemma4ChatHandler (llmplace/compat/_images.py, over llmplace.images); upstream's other model-specific "
           "vision handlers are its own hand-written prompt formats for older models, not provided: use "
           "MTMDChatHandler with the GGUF's chat template, or Llava15ChatHandler for LLaVA-style prompts")
_FUNCTIONARY_V1 = (
    "chat_format='functionary' renders functionary-7b-v1's hand-written 2023 prompt ('assistant to=functions.NAME:') "
    "that no chat template describes and llama.cpp's chat layer does not read: it raises UnsupportedFeatureError. "
    "chat_format='chatml-function-calling' and 'functionary-v1' / 'functionary-v2' map onto llama.cpp's chat layer "
    "(chatml_function_calling, functionary_v1_v2_chat_handler), as does a model's own template with tools")
_NAMED_FORMATS = (
    "llama-cpp-python's Python rendering of one of its named chat formats; llmplace renders "
    "Llama(chat_format=NAME) for the same names with its own templates (llmplace/compat/_chat.py), so the "
    "functions themselves are not provided")
_TEMPLATE_CONSTANTS = (
    "chat template text upstream keeps to recognise a GGUF's template (guess_chat_format_from_gguf_metadata); "
    "llmplace renders with the model's own tokenizer.chat_template and does not guess a format name")
_SCHEMA_CONVERTER = (
    "part of llama-cpp-python's Python JSON-schema-to-GBNF converter; llmplace converts with llama.cpp's C++ "
    "converter (json_schema_to_gbnf, LlamaGrammar.from_json_schema), whose GBNF differs in rule names and "
    "whitespace")
_EXAMPLE_GRAMMARS = ("an example grammar upstream carries as a string (from llama.cpp's grammars/ folder); "
                     "pass any GBNF text to LlamaGrammar.from_string")
_SERVER = (
    "llama-cpp-python's FastAPI / pydantic server application. llmplace has its own OpenAI-compatible server "
    "(`llmplace serve`, `python -m llmplace.server`, taking llama-cpp-python's flags --model, --n_ctx, "
    "--chat_format, --api_key ...); its routes, settings and request models are not these classes")

EXCLUDED: dict[str, str] = {
    # ---- the raw C API (llama_cpp.llama_cpp) and the other ctypes modules ----
    "llama_cpp.llama_cpp.llama_*": _RAW_C_API,
    "llama_cpp.llama_cpp.ggml_*": _RAW_C_API,
    "llama_cpp.llama_cpp.gguf_*": _RAW_C_API,
    "llama_cpp.llama_cpp.Ctypes*": _RAW_C_API,
    "llama_cpp.llama_cpp.ctypes_function*": _RAW_C_API,
    "llama_cpp.llama_cpp.load_shared_library": _RAW_C_API,
    "llama_cpp.llama_cpp.byref": _RAW_C_API,
    "llama_cpp.llama_cpp.LLAMA_VOCAB_PRE_TYPE_*": (
        "llama-cpp-python's hand-written copy of llama.cpp's internal enum llama_vocab_pre_type (src/llama-vocab.h, "
        "not llama.h, so not in llmplace's generated binding); no public llama.cpp function takes or returns it"),
    "llama_cpp.llava_cpp": (
        "ctypes binding of the llava library, which llama.cpp no longer builds (llama-cpp-python 0.3.36 itself "
        "fails to import it: 'Shared library with base name llava not found'); " + _IMAGES),
    "llama_cpp.mtmd_cpp": ("ctypes binding of llama.cpp's libmtmd (multimodal input). llmplace builds and binds "
                           "libmtmd with cffi (its functions are in llmplace._ffi.C) and wraps it in "
                           "llmplace.images (Projector, ImagePrompt); ctypes objects could not be passed to it"),
    "llama_cpp.llama_cpp_ext": (
        "ctypes bindings of llama.cpp's non-public llama-ext.h (next-n / MTP embeddings), which llama-cpp-python "
        "marks as not part of its stable API; llmplace's binding covers llama.h only"),
    "llama_cpp.server.*": _SERVER,
    # ---- llama_cpp.llama ----
    "llama_cpp.llama.Llama.ctx": "a raw ctypes llama_context pointer upstream; use Llama.llmplace_context",
    "llama_cpp.llama.Llama.model": "a raw ctypes llama_model pointer upstream; use Llama.llmplace_model",
    "llama_cpp.llama.Llama.eval_tokens": (
        "upstream's deque of the evaluated tokens, kept in step with each eval(); "
        "read Llama.input_ids[:Llama.n_tokens]"),
    "llama_cpp.llama.Llama.eval_logits": (
        "upstream's deque of the logits of each evaluated token (logits_all=True); llmplace does not keep a "
        "Python copy of every position's logits"),
    "llama_cpp.llama.Llama.sample": (
        "samples one token from the logits of the last eval() with upstream's sampler chain; llmplace samples "
        "inside Llama.generate / create_completion, which take the same sampling keywords"),
    "llama_cpp.*.suppress_stdout_stderr.os": (
        "upstream keeps the os and sys modules as class attributes for use during interpreter shutdown; not an "
        "interface"),
    "llama_cpp.*.suppress_stdout_stderr.sys": (
        "upstream keeps the os and sys modules as class attributes for use during interpreter shutdown; not an "
        "interface"),
    # ---- llama_cpp.llama_chat_format ----
    "llama_cpp.llama_chat_format.format": _NAMED_FORMATS + " (upstream's 'vicuna' renderer is named `format`)",
    "llama_cpp.llama_chat_format.format_*": _NAMED_FORMATS,
    "llama_cpp.llama_chat_format.*_CHAT_TEMPLATE": _TEMPLATE_CONSTANTS,
    "llama_cpp.llama_chat_format.*_BOS_TOKEN": _TEMPLATE_CONSTANTS,
    "llama_cpp.llama_chat_format.*_EOS_TOKEN": _TEMPLATE_CONSTANTS,
    "llama_cpp.llama_chat_format.guess_chat_format_from_gguf_metadata": _TEMPLATE_CONSTANTS,
    "llama_cpp.llama_chat_format.functionary_chat_handler": _FUNCTIONARY_V1,
    **{f"llama_cpp.llama_chat_format.{name}": _IMAGES for name in (
        "ObsidianChatHandler", "MoondreamChatHandler", "Llava16ChatHandler", "NanoLlavaChatHandler",
        "Llama3VisionAlphaChatHandler", "MiniCPMv26ChatHandler", "Qwen25VLChatHandler")},
    "llama_cpp.llama_chat_format.Llama3VisionAlpha": _IMAGES,
    "llama_cpp.llama_chat_format.hf_autotokenizer_to_*": (
        "builds a chat formatter from a transformers AutoTokenizer; not provided: use Jinja2ChatFormatter with "
        "the tokenizer's chat_template, eos_token and bos_token, or the GGUF's own template (the default)"),
    "llama_cpp.llama_chat_format.hf_tokenizer_config_to_*": (
        "builds a chat formatter from a tokenizer_config.json dict; not provided: Jinja2ChatFormatter("
        "config['chat_template'], config['eos_token'], config['bos_token']) does the same"),
    "llama_cpp.llama_chat_format.Singleton": (
        "upstream's metaclass helper that makes its handler registry a singleton; not an interface"),
    "llama_cpp.llama_chat_format.LlamaChatCompletionHandlerRegistry.__init__(args)": (
        "upstream's signature is its Singleton metaclass's __call__(*args, **kwargs); it takes no arguments either"),
    "llama_cpp.llama_chat_format.LlamaChatCompletionHandlerRegistry.__init__(kwargs)": (
        "upstream's signature is its Singleton metaclass's __call__(*args, **kwargs); it takes no arguments either"),
    "llama_cpp.llama_chat_format.Jinja2ChatFormatter.IgnoreGenerationTags": (
        "upstream's Jinja extension class, kept on the formatter; llmplace's Jinja environment is private"),
    "llama_cpp.llama_chat_format.Jinja2ChatFormatter.strftime_now": (
        "upstream's helper kept on the class; llmplace's formatter gives templates the same strftime_now function"),
    "llama_cpp.llama_chat_format.Jinja2ChatFormatter.tojson": (
        "upstream's filter kept on the class; llmplace's formatter gives templates the same tojson filter"),
    # ---- llama_cpp.llama_grammar ----
    "llama_cpp.llama_grammar.SchemaConverter": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.BuiltinRule": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.PRIMITIVE_RULES": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.STRING_FORMAT_RULES": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.RESERVED_NAMES": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.SPACE_RULE": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.DOT": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.DOTALL": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.NON_LITERAL_SET": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.GRAMMAR_LITERAL_ESCAPES": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.GRAMMAR_LITERAL_ESCAPE_RE": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.INVALID_RULE_CHARS_RE": _SCHEMA_CONVERTER,
    "llama_cpp.llama_grammar.*_GBNF": _EXAMPLE_GRAMMARS,
    "llama_cpp.llama_grammar.JSON_GBNF": (
        "provided, with a different value: the same rules as upstream's (llama.cpp's grammars/json.gbnf) without "
        "its two comments"),
}


def exclusion_reason(*keys: str) -> str | None:
    """The reason the first matching entry gives for any of `keys` (exact names before patterns)."""
    for key in keys:
        if key in EXCLUDED:
            return EXCLUDED[key]
    for key in keys:
        for pattern, reason in EXCLUDED.items():
            if "*" in pattern and fnmatchcase(key, pattern):
                return reason
    return None
