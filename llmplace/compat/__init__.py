"""llama-cpp-python 0.3.36's interface on llmplace: change `from llama_cpp import Llama` to
`from llmplace import Llama` (or `from llmplace.compat import Llama`) and keep the rest of the code.

What is the same: the constructor's keywords and defaults (model_path positional), `__call__` /
`create_completion`, `create_chat_completion` (+ `_openai_v1`), `create_embedding` / `embed`, `tokenize` /
`detokenize` (bytes), `n_ctx()`, `n_vocab()`, `n_embd()`, `token_bos/eos/nl()`, `metadata`, `reset()`,
`close()` and `with`, the returned dicts (keys, types, nesting), greedy output, llama-cpp-python's seed
sequence, and the common errors' types and messages (ValueError "Model path does not exist: ...",
"Requested tokens (N) exceed context window of M", "logprobs is not supported for models created with
logits_all=False").

What is left out of llama-cpp-python's public surface (the raw ctypes C API, llava/mtmd bindings, its FastAPI
server classes, the Python chat-format renderers, the Python JSON-schema converter ...) is listed, name by name
with the reason, in `llmplace.compat.surface.EXCLUDED`; tests/test_compat_surface.py checks every other public
name, class member and parameter of llama-cpp-python 0.3.36 against this layer.

What differs (each is warned about or raises a typed error when used):
- Grammars: `grammar=LlamaGrammar.from_string(gbnf)`, `response_format={"type": "json_object"}` (with or
  without "schema") and `{"type": "json_schema", "json_schema": {"schema": ...}}` (llama-cpp-python ignores
  this type) are enforced by llama.cpp's grammar sampler. `LlamaGrammar.from_json_schema` /
  `llama_grammar.json_schema_to_gbnf` use llama.cpp's C++ converter, not llama-cpp-python's Python one: the
  GBNF text differs (rule names, whitespace), and a schema the converter refuses raises
  `llama_grammar.JsonSchemaError` (a ValueError) where llama-cpp-python's chat handler falls back to any JSON
  object silently. What the converter cannot enforce (e.g. a pattern not anchored with ^...$) it relaxes,
  printing a warning on stderr (llama.cpp's fprintf, not the `logging` logger).
- A forced tool / function call (`tool_choice={"type": "function", "function": {"name": N}}`, or `functions`
  with `function_call={"name": N}`) constrains the reply to N's `parameters` schema and returns the message
  with `tool_calls` and `function_call` (content None), streamed as tool_calls deltas, as llama-cpp-python's
  default handler does; the tools are not shown to the model beyond what the chat template renders.
  Differences: finish_reason is "length" (not "tool_calls") when max_tokens cuts the arguments short; a
  tool_choice naming a function with no `tools` given raises ValueError (llama-cpp-python ignores it);
  streams send no empty arguments delta before the final chunk.
- Mirostat (`mirostat_mode` 1 and 2) runs llama.cpp's mirostat samplers on the raw logits, as
  llama-cpp-python chains them; such a call decodes without speculation. `LlamaDiskCache` keeps states in
  files of its own (no diskcache package). `kv_overrides` and `lora_path`/`lora_scale` are applied (a
  kv_overrides value whose type differs from the file's key raises InvalidParameterError).
- Tools the model chooses itself (tool_choice "auto" / "required") and reasoning_content go through llama.cpp's
  chat layer when the template describes tools (llmplace/compat/_chat_tools.py), and so do the function-calling
  chat formats "chatml-function-calling" (ChatML with the tools described; calls written as <tool_call> JSON,
  not upstream's own "functions.<name>:" lines) and "functionary-v1" / "functionary-v2" (the GGUF's own
  functionary template; upstream reads it through a Hugging Face tokenizer).
- Not implemented yet, raising `UnsupportedFeatureError` (a NotImplementedError): the "functionary" chat format
  (functionary-7b-v1's prompt) and the vision chat formats ("llava-1-5" ...), image content parts, a grammar in
  `Llama.generate`.
- Accepted but not applied, with a `CompatibilityWarning`: lora_base, numa, a draft_model that is a Python
  LlamaDraftModel subclass, and unknown keywords (llama-cpp-python ignores those silently).
  `LlamaPromptLookupDecoding` and `LlamaDraftModelFile` (llama_speculative) run llmplace's own
  speculative decoding, which refuses typical_p; calls with penalties, logits processors, stopping criteria,
  grammars or logprobs decode without speculation.
- Arguments are checked when `create_completion(stream=True)` is called, not at the first chunk.
- `suffix=` uses the model's fill-in-the-middle tokens; a model without them gets the suffix appended
  to the text (llama-cpp-python puts token 0 in their place).
- Streams: text held back because it may begin a stop string comes out in one chunk (llama-cpp-python sends
  it one chunk per token, sometimes with an empty chunk before the final one); the text is the same.
- Logprobs are Python floats (llama-cpp-python returns numpy float32 in non-streamed completions); with
  echo=True each prompt token gets the logprob it was predicted with (llama-cpp-python's are one position
  late for models without BOS, and it leaves out the last token).
- embed() of several texts gives each the same vectors as embedding it alone (llama-cpp-python 0.3.36 reads
  the per-token embeddings of every text after the first at a wrong offset).
- `save_state()`'s LlamaState holds no scores (an empty array).
- `detokenize` returns every token's whole piece: llama-cpp-python reads pieces into a 32-byte buffer and puts
  other bytes in place of a longer piece. Token ids that are not ints raise TokenizationError.
- `tokenize` takes valid UTF-8 only (TokenizationError saying where it breaks): llama-cpp-python passes any
  bytes to llama.cpp, which reads each invalid byte as U+FFFD.
- A grammar (or schema, or forced tool) that no text can match raises InvalidParameterError at the first
  token it cannot continue (llama-cpp-python's process aborts in llama.cpp's grammar sampler).
- pickle and copy reload the model from the constructor's arguments, with a fresh context, as upstream does.
- `LlamaPromptLookupDecoding(...)(input_ids)` proposes what llama-cpp-python's does; as a draft_model it runs
  llmplace's own prompt-lookup drafter.
- n_threads=None means llmplace.context.default_threads() (llama-cpp-python: half the cores); verbose=True does
  not print llama.cpp's log (set LLMPLACE_LOG=info, it goes to the `logging` logger "llmplace").
- `Llama.from_pretrained(repo_id, filename_glob)` needs huggingface_hub (not a dependency of llmplace).
- `install()` makes `import llama_cpp` in this process give this layer (for third-party code that imports
  llama_cpp itself); nothing is installed on disk.
- `llm.model` / `llm.ctx` (raw ctypes pointers upstream) do not exist: use `llm.llmplace_model` and
  `llm.llmplace_context`.

Greedy text equals llama-cpp-python's wherever the two builds' logits agree to the last bits that matter:
the llama-cpp-python wheel built for this CPU (AVX-512, OpenMP) computes one-token decodes about 1e-2 away
from its own batched decode, so the texts part at the first near-tie (see tests/test_compat.py).
"""

from __future__ import annotations

from . import llama_cache, llama_chat_format, llama_grammar, llama_speculative, llama_tokenizer, llama_types
from ._install import install, uninstall
from .errors import CompatibilityWarning, UnsupportedFeatureError
from .llama import (Llama, LogitsProcessor, LogitsProcessorList, MinTokensLogitsProcessor, ModelPathError,
                    StoppingCriteria, StoppingCriteriaList)
from .llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache, LlamaState
# The low-level names (LLAMA_SPLIT_MODE_*, GGML_TYPE_*, llama_supports_gpu_offload ...), as llama_cpp exports them.
from .llama_cpp import *  # noqa: F403
from .llama_cpp import __all__ as _low_level_names
from .llama_grammar import LlamaGrammar
from .llama_speculative import LlamaDraftModel
from .llama_tokenizer import BaseLlamaTokenizer, LlamaTokenizer
# The OpenAI-shaped types: llama-cpp-python re-exports them here (its llama.py star-imports llama_types), so
# `from llama_cpp import ChatCompletionRequestUserMessage` is common.
from .llama_types import *  # noqa: F403
from .verbosity import set_verbose, suppress_stdout_stderr


# The llama-cpp-python version whose interface this layer follows (what `llama_cpp.__version__` reads after
# install()); llmplace's own version is llmplace.__version__.
__version__ = "0.3.36"

__all__ = ["Llama", "LogitsProcessorList", "StoppingCriteriaList", "MinTokensLogitsProcessor", "llama_types",
           "llama_speculative", "llama_chat_format", "llama_grammar", "LlamaGrammar", "install", "uninstall",
           "llama_cache", "BaseLlamaCache", "LlamaCache", "LlamaRAMCache", "LlamaDiskCache", "LlamaState",
           "llama_tokenizer", "BaseLlamaTokenizer", "LlamaTokenizer", "LlamaDraftModel", "LogitsProcessor",
           "StoppingCriteria", "set_verbose", "suppress_stdout_stderr",
           "UnsupportedFeatureError", "CompatibilityWarning", "ModelPathError", *_low_level_names,
           *llama_types.__all__]
