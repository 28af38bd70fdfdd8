"""`Llama`: llama-cpp-python 0.3.36's high-level class, over llmplace's Model, Context and stream_generate.

Code written for `llama_cpp.Llama` runs unchanged after `from llmplace import Llama`: same constructor
keywords and defaults, same methods, same return dicts, same exception types and messages for the common
mistakes. What differs is listed in `llmplace/compat/__init__.py` and warned about at the call that uses it.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

from .._ffi import C
from ..chat_tools import REASONING_FORMATS
from ..context import KV_TYPES, Context
from ..context_lock import GenerationHold
from ..errors import InvalidParameterError, ModelLoadError, unknown_keyword_error
from ..model import Model
from ..planning import load
from ..placement import Placement
from ..placement import n_cpu_moe as _n_cpu_moe_rules
from . import _chat, _completion
from .errors import CompatibilityWarning, UnsupportedFeatureError
from .llama_cache import LlamaState, longest_token_prefix
from .llama_chat_format import registered_handler
from .llama_cpp import LLAMA_DEFAULT_SEED
from .llama_speculative import speculation_options
from .llama_types import (
    ChatCompletionRequestMessage,
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
    CreateCompletionResponse,
    CreateCompletionStreamResponse,
    CreateEmbeddingResponse,
)


class _DropOutputOverrideNotice(logging.Filter):
    """embed() decodes with llama_batch_get_one, which asks for the last token's output only; in embedding mode
    llama.cpp then outputs every token anyway and logs a warning saying so at each call. That is the
    intended behaviour here, so the warning is dropped (llama-cpp-python marks every token instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "embeddings required but some input tokens were not marked as outputs" not in record.getMessage()


logging.getLogger("llmplace.native").addFilter(_DropOutputOverrideNotice())

_SPLIT_MODES = {C.LLAMA_SPLIT_MODE_NONE: "none", C.LLAMA_SPLIT_MODE_LAYER: "layer",
                C.LLAMA_SPLIT_MODE_ROW: "row", C.LLAMA_SPLIT_MODE_TENSOR: "tensor"}
_KV_TYPE_NAMES = {value: name for name, value in KV_TYPES.items()}


class ModelPathError(ModelLoadError, ValueError):
    """The model could not be loaded. A ValueError as in llama-cpp-python, and an llmplace ModelLoadError."""


def _kv_type(name: str, value) -> str:
    if value is None:
        return "f16"
    if isinstance(value, str):
        return value
    try:
        return _KV_TYPE_NAMES[value]
    except KeyError:
        raise InvalidParameterError(
            f"{name}={value!r} is not a KV-cache type llama.cpp supports; use one of the GGML_TYPE_* constants of "
            f"{sorted(_KV_TYPE_NAMES)} (or a name: {sorted(KV_TYPES)})") from None


class Llama:
    """A loaded model and one context, with llama-cpp-python's interface. See `llama_cpp.Llama`."""

    def __init__(
        self,
        model_path: str,
        *,
        # model parameters
        n_gpu_layers: int = 0,
        split_mode: int = C.LLAMA_SPLIT_MODE_LAYER,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        # context parameters
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        rope_scaling_type: int | None = C.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        pooling_type: int = C.LLAMA_POOLING_TYPE_UNSPECIFIED,
        attention_type: int = C.LLAMA_ATTENTION_TYPE_UNSPECIFIED,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: bool = False,
        op_offload: bool | None = None,
        swa_full: bool | None = None,
        # sampling parameters
        no_perf: bool = False,
        last_n_tokens_size: int = 64,
        # LoRA
        lora_base: str | None = None,
        lora_scale: float = 1.0,
        lora_path: str | None = None,
        # backend
        numa: bool | int = False,
        # chat
        chat_format: str | None = None,
        chat_handler: Any | None = None,
        # speculative decoding
        draft_model: Any | None = None,
        # tokenizer override
        tokenizer: Any | None = None,
        # KV cache types (GGML_TYPE_* ints, or llmplace's names such as "q8_0")
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        # misc
        spm_infill: bool = False,
        verbose: bool = True,
        # llmplace's own
        override_tensor: Any = None,
        placement: Any = None,
        n_cpu_moe: int | None = None,
        rpc_servers: Sequence[str] | None = None,
        fit: bool = False,
        budget: Any = None,
        reasoning_format: str = "auto",
        **kwargs: Any,
    ) -> None:
        """Load `model_path` and create its context. Keywords as llama_cpp.Llama, plus llmplace's placement:

        override_tensor: llama.cpp `-ot` rules ("exps=CPU,blk\\.1[0-9]\\.=CUDA0") or llmplace Rules;
        placement: a llmplace Placement (or anything Placement.parse reads); n_cpu_moe: keep the MoE experts of
        the first N layers in RAM; rpc_servers: "host:port" strings (or one comma-separated string);
        fit=True: choose n_gpu_layers / tensor_split / overrides (and n_ctx when it is 0) that fit each device's
        `budget` ({"CUDA0": "12GiB", "host": "32GiB"}; default: free memory), keeping the placement rules.
        reasoning_format: llama-server's --reasoning-format for models that think (<think>...</think> and the
        other formats llama.cpp knows): "auto" (default) puts the thinking in the message's reasoning_content,
        "none" leaves it inline in content, "deepseek-legacy" splits it in whole replies but streams it inline.
        """
        # What pickle and copy keep (__getstate__): the arguments as given. First, while locals() holds only them.
        arguments = dict(locals())
        del arguments["self"]
        arguments.update(arguments.pop("kwargs"))
        self._arguments = arguments
        # None only until the model has loaded (close() and __del__ see that when loading fails); typed as what
        # every other method finds there
        self._model: Model = None  # type: ignore[assignment]
        self._ctx: Context | None = None
        self.verbose = verbose
        self.model_path = model_path
        typos = {name for name in kwargs
                 if difflib.get_close_matches(name, _LLAMA_KEYWORDS, n=1, cutoff=_TYPO_SIMILARITY)}
        if typos:
            # llama-cpp-python would ignore `n_ctxx=` silently and run with the default context: a keyword this
            # close to a real one is a typo, not an option of another version, so it stops here with the fix
            raise unknown_keyword_error("Llama", typos, _LLAMA_KEYWORDS)
        if kwargs:
            # llama-cpp-python accepts unknown keywords silently (another version's options); say they do nothing
            warnings.warn(f"llmplace.Llama ignores {', '.join(sorted(kwargs))}: not a keyword of Llama (unknown "
                          "keywords are accepted, as llama-cpp-python does)", CompatibilityWarning, stacklevel=2)
        ignored: dict[str, object] = {}
        if lora_base is not None:
            # llama-cpp-python passes it to llama.cpp's old API, which this llama.cpp no longer has
            ignored["lora_base"] = lora_base
        if numa:
            ignored["numa"] = numa
        self._speculation = speculation_options(draft_model)
        if draft_model is not None and self._speculation is None:
            ignored["draft_model (a Python LlamaDraftModel)"] = draft_model
        if ignored:
            # options llama-cpp-python has and llmplace does not implement yet should not go unnoticed
            warnings.warn(f"llmplace.Llama ignores {', '.join(sorted(ignored))}: not supported by llmplace yet "
                          "(unknown keywords are accepted, as llama-cpp-python does)", CompatibilityWarning,
                          stacklevel=2)
        if reasoning_format not in REASONING_FORMATS:
            raise InvalidParameterError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, not "
                                        f"{reasoning_format!r}")
        self.reasoning_format = reasoning_format
        if not os.path.exists(model_path):
            raise ValueError(f"Model path does not exist: {model_path}")

        # ---- what to keep (llama-cpp-python exposes these as attributes) ----
        self.tensor_split = tensor_split
        self.kv_overrides = kv_overrides
        self.lora_base, self.lora_scale, self.lora_path = lora_base, lora_scale, lora_path
        self.numa = numa
        self.spm_infill = spm_infill
        self.last_n_tokens_size = last_n_tokens_size
        self.draft_model = draft_model
        self.chat_handler = chat_handler
        self._logits_all = logits_all
        self._embedding = embedding
        self._seed = seed or LLAMA_DEFAULT_SEED
        self.cache: BaseLlamaCache | None = None

        # ---- the model ----
        rules = Placement.parse(override_tensor) + Placement.parse(placement)
        if n_cpu_moe:
            rules = rules + _n_cpu_moe_rules(n_cpu_moe)
        if isinstance(rpc_servers, str):
            rpc_servers = [s for s in rpc_servers.split(",") if s]
        try:
            split = _SPLIT_MODES[split_mode] if not isinstance(split_mode, str) else split_mode
        except KeyError:
            raise InvalidParameterError(f"split_mode={split_mode!r} is not one of the LLAMA_SPLIT_MODE_* values "
                                        f"{sorted(_SPLIT_MODES)}") from None
        if budget is not None and not fit:
            raise InvalidParameterError("budget= is used by the memory fit: pass fit=True as well")
        try:
            if fit:
                # llmplace's memory fit picks the offload and, for n_ctx=0, the largest context that fits.
                self._model = load(model_path, fit=True, budget=budget, n_ctx=n_ctx, split_mode=split,
                                   main_gpu=main_gpu, use_mmap=use_mmap and lora_path is None, use_mlock=use_mlock,
                                   progress=False, placement=rules if len(rules) else None, rpc_servers=rpc_servers,
                                   kv_overrides=kv_overrides)
                fitted = self._model.fit_result
                assert fitted is not None  # load(fit=True) sets it
                n_ctx = fitted.n_ctx
            else:
                self._model = Model(model_path, n_gpu_layers=n_gpu_layers, split_mode=split, main_gpu=main_gpu,
                                    use_mmap=use_mmap and lora_path is None, use_mlock=use_mlock,
                                    vocab_only=vocab_only, progress=False, placement=rules if len(rules) else None,
                                    tensor_split=tensor_split, rpc_servers=rpc_servers, kv_overrides=kv_overrides)
        except ModelLoadError as exc:
            if isinstance(exc, ValueError):
                raise
            raise ModelPathError(f"Failed to load model from file: {model_path} ({exc})") from exc
        self.metadata: dict[str, str] = self._model.metadata
        self.tokenizer_ = tokenizer

        # ---- the context ----
        if n_ctx == 0:
            n_ctx = self._model.n_ctx_train
        self.n_batch = min(n_ctx, n_batch)
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        c_params = {
            "rope_scaling_type": (C.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED if rope_scaling_type is None
                                  else rope_scaling_type),
            "pooling_type": pooling_type, "attention_type": attention_type,
            "rope_freq_base": rope_freq_base, "rope_freq_scale": rope_freq_scale,
            "yarn_ext_factor": yarn_ext_factor, "yarn_attn_factor": yarn_attn_factor,
            "yarn_beta_fast": yarn_beta_fast, "yarn_beta_slow": yarn_beta_slow, "yarn_orig_ctx": yarn_orig_ctx,
            "embeddings": embedding, "offload_kqv": offload_kqv, "no_perf": no_perf,
        }
        if op_offload is not None:
            c_params["op_offload"] = op_offload
        if swa_full is not None:
            c_params["swa_full"] = swa_full
        if not vocab_only:
            try:
                lora = {self._model.load_lora(lora_path): lora_scale} if lora_path is not None else None
                self._ctx = Context(self._model, n_ctx=n_ctx, n_batch=self.n_batch,
                                    n_ubatch=min(self.n_batch, n_ubatch), n_threads=n_threads,
                                    n_threads_batch=n_threads_batch, flash_attn=bool(flash_attn),
                                    type_k=_kv_type("type_k", type_k), type_v=_kv_type("type_v", type_v),
                                    extra_params=c_params, lora=lora)
            except BaseException:
                self._model.close()
                raise
            self.n_threads = self._ctx.n_threads

        # ---- chat format (the same attribute values llama-cpp-python sets) ----
        if chat_format is None and chat_handler is None:
            chat_format = "chat_template.default" if self._model.chat_template else "llama-2"
        self.chat_format = chat_format

    # ---- lifetime ----
    def close(self) -> None:
        """Free the context and the model. Safe to call twice, and from another thread: a call in flight there
        is stopped (its decode aborted) and waited for, and then raises ClosedError."""
        if self._ctx is not None:
            self._ctx.close()
        if self._model is not None:
            self._model.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the native handles' own finalizers take over
            pass

    def __getstate__(self) -> dict[str, Any]:
        """pickle and copy keep the constructor's arguments, as llama-cpp-python's Llama does: unpickling, or a
        copy, loads the model again, with a fresh context (the native model and context cannot travel, and a
        copy sharing them would free them under the original when it is dropped)."""
        return dict(self._arguments)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # ---- llmplace objects under the compatibility layer ----
    @property
    def llmplace_model(self) -> Model:
        """The llmplace Model this object wraps (placement_report(), metadata, vocab ...)."""
        return self._model

    @property
    def llmplace_context(self) -> Context | None:
        """The llmplace Context this object generates with (None for vocab_only models)."""
        return self._ctx

    def _context(self) -> Context:
        if self._ctx is None:
            raise InvalidParameterError("this model was loaded with vocab_only=True: it can tokenize but not "
                                        "generate; load it without vocab_only")
        return self._ctx

    # ---- sizes and special tokens ----
    def n_ctx(self) -> int:
        """The context window size."""
        return self._context().n_ctx

    def n_embd(self) -> int:
        return self._model.n_embd

    def n_vocab(self) -> int:
        return self._model.n_vocab

    def token_bos(self) -> int:
        bos = self._model.vocab.bos
        return -1 if bos is None else bos

    def token_eos(self) -> int:
        eos = self._model.vocab.eos
        return -1 if eos is None else eos

    def token_nl(self) -> int:
        nl = self._model.vocab.nl
        return -1 if nl is None else nl

    def pooling_type(self) -> int:
        return C.llama_pooling_type(self._context()._ptr)

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def set_cache(self, cache) -> None:
        """Keep the state after each completion in `cache` (a LlamaRAMCache, or None for no cache); a prompt
        sharing a longer prefix with a cached state than with the context restores it first."""
        if cache is not None and (isinstance(cache, dict) or
                                  not all(hasattr(cache, m) for m in ("__getitem__", "__setitem__"))):
            # a dict cannot: its keys must be hashable (a token list is not) and match exactly, where a cache
            # answers the entry sharing the longest prefix
            raise InvalidParameterError(f"the cache must be a LlamaRAMCache or LlamaDiskCache (or an object that "
                                        f"maps token lists to the LlamaState sharing the longest prefix), not "
                                        f"{type(cache).__name__}")
        self.cache = cache

    @contextlib.contextmanager
    def _changing(self) -> Iterator[Context]:
        """The context, held for a call that changes what it holds (reset, eval, load_state): BusyError while a
        generation holds it (a stream not finished, or a logits processor or stopping criterion of one), which
        would otherwise go on from a KV cache changed under it and give wrong text with no error."""
        ctx = self._context()
        hold = GenerationHold(ctx)
        try:
            yield ctx
        finally:
            hold.release()

    def save_state(self) -> LlamaState:
        """The context's state (KV cache and tokens) for load_state."""
        ctx = self._context()
        data = ctx.save_state()
        return LlamaState(input_ids=np.asarray(ctx.tokens, dtype=np.intc),
                          scores=np.empty((0, self.n_vocab()), dtype=np.single), n_tokens=len(ctx.tokens),
                          llama_state=data, llama_state_size=len(data), seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Restore a state from save_state (same model and n_ctx)."""
        with self._changing() as ctx:
            self._restore(ctx, state)

    def _restore(self, ctx: Context, state: LlamaState) -> None:
        """load_state's work, for a caller that holds the context already (a completion restoring its cache)."""
        if not all(hasattr(state, name) for name in ("llama_state", "input_ids", "n_tokens", "seed")):
            raise InvalidParameterError(f"load_state takes the LlamaState save_state returned, not "
                                        f"{type(state).__name__}")
        ctx.load_state(state.llama_state, state.input_ids[:state.n_tokens].tolist())
        self._seed = state.seed

    # ---- text <-> tokens ----
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of UTF-8 `text` (bytes). add_bos adds BOS (and EOS) as the model asks; special parses
        special-token text such as '<|im_start|>'."""
        if self.tokenizer_ is not None:
            return self.tokenizer_.tokenize(text, add_bos, special)
        # any truth value, as llama-cpp-python's ctypes call reads them
        return self._model.vocab.tokenize(text, add_special=bool(add_bos), parse_special=bool(special))

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes `tokens` stand for. prev_tokens is accepted for compatibility (llama-cpp-python ignores it too).
        As llama-cpp-python, a list that starts with BOS loses the leading space of its text (see
        llama_tokenizer.vocab_detokenize)."""
        if self.tokenizer_ is not None:
            return self.tokenizer_.detokenize(tokens, prev_tokens=prev_tokens, special=special)
        from .llama_tokenizer import vocab_detokenize

        return vocab_detokenize(self._model.vocab, tokens, special=special)

    def tokenizer(self):
        return self.tokenizer_ if self.tokenizer_ is not None else self

    def reset(self) -> None:
        """Forget the cached tokens (the next prompt is computed from scratch)."""
        if self._ctx is not None:
            with self._changing() as ctx:
                ctx.clear()

    @property
    def n_tokens(self) -> int:
        """Tokens held in the context (the last prompt and reply)."""
        return len(self._context().tokens)

    @property
    def input_ids(self) -> np.ndarray:
        """The tokens held in the context, as int32 (llama-cpp-python's array is n_ctx long, filled to n_tokens)."""
        return np.asarray(self._context().tokens, dtype=np.intc)

    def eval(self, tokens: Sequence[int]) -> None:
        """Append tokens to the context and compute them."""
        with self._changing() as ctx:
            ctx.decode([int(t) for t in tokens])

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None, grammar=None):
        """Yield sampled token ids after `tokens`, without end: stop iterating when done. reset=True reuses the
        cached prefix of `tokens`; reset=False appends them to what the context holds."""
        if grammar is not None:
            raise UnsupportedFeatureError("a grammar in Llama.generate is not supported by llmplace.Llama yet; "
                                          "create_completion and create_chat_completion take grammar=")
        seed = self._seed & 0xFFFFFFFF
        params = _completion.sampling_params(
            self, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            seed=seed, logit_bias=None, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta)
        return _completion.generate_tokens(self, tokens, params, reset, logits_processor or None,
                                           stopping_criteria or None)

    # ---- completion ----
    def create_completion(self, prompt: str | list[int], suffix: str | None = None,
                          max_tokens: int | None = 16, temperature: float = 0.8, top_p: float = 0.95,
                          min_p: float = 0.05, typical_p: float = 1.0, logprobs: int | None = None,
                          echo: bool = False, stop: str | list[str] | None = [],  # noqa: B006 - as upstream
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: int | None = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: str | None = None, stopping_criteria=None, logits_processor=None,
                          grammar=None, logit_bias: dict[int, float] | None = None,
                          ) -> CreateCompletionResponse | Iterator[CreateCompletionStreamResponse]:
        """Generate text from a prompt (str or token ids): a `text_completion` dict, or with stream=True an
        iterator of chunks. Arguments are checked here, also for streams."""
        return _completion.create(
            self, prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, stream=stream,
            seed=seed, mirostat_mode=mirostat_mode, model=model, stopping_criteria=stopping_criteria,
            logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias, mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta)

    def __call__(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                 temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                 logprobs: int | None = None, echo: bool = False,
                 stop: str | list[str] | None = [],  # noqa: B006 - as upstream
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                 top_k: int = 40, stream: bool = False, seed: int | None = None, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 model: str | None = None, stopping_criteria=None, logits_processor=None, grammar=None,
                 logit_bias: dict[int, float] | None = None,
                 ) -> CreateCompletionResponse | Iterator[CreateCompletionStreamResponse]:
        """Same as create_completion."""
        return self.create_completion(
            prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)

    # ---- chat ----
    def create_chat_completion(self, messages: list[ChatCompletionRequestMessage], functions=None,
                               function_call=None, tools=None, tool_choice=None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0,
                               stream: bool = False, stop: str | list[str] | None = [],  # noqa: B006
                               seed: int | None = None, response_format=None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                               logits_processor=None, grammar=None, logit_bias: dict[int, float] | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None,
                               *, reasoning_format: str | None = None,
                               chat_template_kwargs: dict[str, Any] | None = None,
                               parallel_tool_calls: bool | None = None,
                               reasoning_budget_tokens: int | None = None,
                               ) -> CreateChatCompletionResponse | Iterator[CreateChatCompletionStreamResponse]:
        """Reply to `messages` rendered with the model's chat template: a `chat.completion` dict, or with
        stream=True an iterator of `chat.completion.chunk` dicts.

        With `tools`, when the model's own template describes tools, llama.cpp's chat layer renders them and
        parses the reply into message.tool_calls (finish_reason "tool_calls"): tool_choice "auto" lets the model
        choose (the call's grammar starts at the family's trigger), "required" or a named function constrain
        the reply to end in a call (text may come first, as llama-server allows), "none" forbids one. A template
        that cannot describe tools keeps llama-cpp-python's behaviour, except that "required" then describes
        the tools in a system message and constrains the reply to {"name": ..., "arguments": ...}.
        Models that think get message.reasoning_content (and reasoning_content stream deltas);
        reasoning_format overrides the Llama's for this call ("none": inline), and
        chat_template_kwargs={"enable_thinking": False} asks templates that support it for no thinking, and
        reasoning_budget_tokens=N ends the thinking after N tokens (0: at once; -1: no limit), as llama-server
        takes them."""
        options = dict(messages=messages, functions=functions, function_call=function_call, tools=tools,
                       tool_choice=tool_choice, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       typical_p=typical_p, stream=stream, stop=stop, seed=seed, response_format=response_format,
                       max_tokens=max_tokens, presence_penalty=presence_penalty,
                       frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
                       mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
                       model=model, logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias,
                       logprobs=logprobs, top_logprobs=top_logprobs)
        handler = self.chat_handler or registered_handler(self.chat_format)
        if handler is not None:
            # A llama-cpp-python style chat handler: it renders the prompt and calls back create_completion.
            return handler(llama=self, **options)
        return _chat.create(self, **options, reasoning_format=reasoning_format,
                            chat_template_kwargs=chat_template_kwargs, parallel_tool_calls=parallel_tool_calls,
                            reasoning_budget_tokens=reasoning_budget_tokens)

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any):
        """create_chat_completion, returning the openai package's ChatCompletion / ChatCompletionChunk objects."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("To use create_chat_completion_openai_v1, you must install the openai package. "
                              "You can install it with `pip install openai`.") from None
        # Any: the dicts are validated into openai's models by pydantic, not matched to their field types here
        response: Any = self.create_chat_completion(*args, **kwargs)
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in response)
        return ChatCompletion(**response)

    # ---- embeddings ----
    def create_embedding(self, input: str | list[str], model: str | None = None) -> CreateEmbeddingResponse:
        """Embed a string or a list of strings: an OpenAI-shaped `list` of `embedding` objects."""
        vectors, total = self.embed(input if isinstance(input, list) else [input], return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": vector, "index": i} for i, vector in enumerate(vectors)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Embeddings of a string (one vector, or one per token when the model does not pool) or of a list of
        strings (a list of those)."""
        ctx = self._context()
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        texts = [input] if isinstance(input, str) else list(input)
        n_batch = self.n_batch
        results, total = [], 0
        # Held for all the inputs: another thread's call in between would see (or clear) a half-done cache.
        hold = GenerationHold(ctx)
        try:
            for text in texts:
                tokens = self.tokenize(text.encode("utf-8"))
                if truncate:
                    tokens = tokens[:n_batch]
                if len(tokens) > n_batch:
                    raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {n_batch}")
                if not tokens:
                    raise InvalidParameterError("cannot embed an empty string: it has no tokens")
                total += len(tokens)
                # Each input is its own sequence from position 0: clear what the previous one left.
                ctx.clear()
                ctx.decode(tokens)
                values = ctx.embeddings(len(tokens))
                if normalize:
                    norms = np.linalg.norm(values, axis=-1, keepdims=True)
                    values = np.divide(values, norms, out=values, where=norms != 0)
                results.append(values.tolist())
        finally:
            try:
                ctx.clear()
            finally:
                hold.release()
        output = results[0] if isinstance(input, str) else results
        return (output, total) if return_count else output

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None, additional_files: list | None = None,
                        local_dir=None, local_dir_use_symlinks="auto", cache_dir=None, **kwargs: Any) -> Llama:
        """Download the GGUF of Hugging Face Hub repository `repo_id` whose name matches the glob `filename`
        (exactly one must match; huggingface_hub's cache is reused) and load it with the other keywords.
        local_dir_use_symlinks is accepted and ignored (huggingface_hub no longer uses it)."""
        from ._hub import download

        # filename=None fails in the glob match, as upstream's does (its signature says Optional all the same)
        model_path = download(repo_id, filename, additional_files=additional_files,  # type: ignore[arg-type]
                              local_dir=local_dir, cache_dir=cache_dir)
        return cls(model_path=model_path, **kwargs)

    # ---- llama-cpp-python helpers people call ----
    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        """log_softmax of `logits` along `axis` (float32)."""
        logits = np.asarray(logits, dtype=np.float32)
        top = np.amax(logits, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        shifted = logits - top
        with np.errstate(divide="ignore"):
            return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return longest_token_prefix(a, b)

    def __repr__(self) -> str:
        return f"<llmplace.Llama {os.path.basename(str(self.model_path))}>"


# the keywords Llama() takes, and how similar an unknown one must be to count as a typo of one (difflib's ratio:
# n_ctxx / n_ctx 0.91, n_gpu_layer 0.96, while options of other versions such as `n_threads_draft` stay below: 0.80)
_LLAMA_KEYWORDS = sorted(set(inspect.signature(Llama.__init__).parameters) - {"self", "model_path", "kwargs"})
_TYPO_SIMILARITY = 0.85


class LogitsProcessorList(list):
    """Logits processors applied in order: each takes (input_ids, scores) and returns new scores."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """Stopping criteria: generation stops when any returns True for (input_ids, logits)."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])


class MinTokensLogitsProcessor:
    """Forbids the end-of-sequence token until `min_tokens` tokens have been generated."""

    def __init__(self, min_tokens: int, token_eos: int) -> None:
        self.min_tokens, self.token_eos = min_tokens, token_eos
        self.prompt_tokens: int | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


# What llama-cpp-python's llama.py also offers (its star import of llama_types and the helpers it imports), so that
# `from llama_cpp.llama import X` works for the same X (tests/test_compat_surface.py checks the list).
from .llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache  # noqa: E402,F401
from .llama_grammar import LlamaGrammar  # noqa: E402,F401
from .llama_speculative import LlamaDraftModel  # noqa: E402,F401
from .llama_tokenizer import BaseLlamaTokenizer, LlamaTokenizer  # noqa: E402,F401
from .llama_types import *  # noqa: E402,F401,F403
from .verbosity import set_verbose, suppress_stdout_stderr  # noqa: E402,F401

# The call signatures of a logits processor and a stopping criterion (llama-cpp-python's llama.py names them).
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]
