"""Context: an inference session on a model (KV cache, batch sizes, threads) and batched decoding."""

from __future__ import annotations

import functools
import numbers
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Mapping, ParamSpec, Sequence, TypeVar

import numpy as np

from ._handle import NativeObject
from .backends import cpu_backend_function
from ._ffi import C, CData, ffi
from .c_values import FLASH_ATTN_TYPES, INT32, integer, set_fields
from .context_lock import BUSY_MESSAGE, ContextLock  # noqa: F401 - BUSY_MESSAGE: where callers found it
from .errors import ContextOverflowError, InvalidParameterError, OutOfMemoryError, check
from .model import Model
from .native_errors import NO_REASON, native_call

if TYPE_CHECKING:
    import numpy.typing as npt

    from .lora import LoRA

# KV-cache element types accepted for type_k / type_v.
KV_TYPES = {
    "f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "bf16": C.GGML_TYPE_BF16, "q8_0": C.GGML_TYPE_Q8_0,
    "q4_0": C.GGML_TYPE_Q4_0, "q4_1": C.GGML_TYPE_Q4_1, "q5_0": C.GGML_TYPE_Q5_0, "q5_1": C.GGML_TYPE_Q5_1,
    "iq4_nl": C.GGML_TYPE_IQ4_NL,
}
_FLASH_ATTN = FLASH_ATTN_TYPES  # c_values: memory.py reads the same map
# Far beyond any model's trained context; larger values are typos (and overflow llama.cpp's uint32).
MAX_N_CTX = 1 << 24
DEFAULT_N_CTX = 4096
MAX_SEQ = 256  # LLAMA_MAX_SEQ
# llama_context_params fields `extra_params` may set (what llama-cpp-python's Llama passes through). The others
# are Context's own keywords (n_ctx, type_k ...), pointers and callbacks, or sizes llama.cpp asserts on
# (n_outputs_max: a decode with more outputs aborts the process).
EXTRA_PARAMS = {"rope_scaling_type", "pooling_type", "attention_type", "rope_freq_base", "rope_freq_scale",
                "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx",
                "defrag_thold", "embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full", "kv_unified"}


def default_threads() -> int:
    """Threads a Context uses when n_threads is not given: one per physical core this process may run on, less
    the cores other programs keep busy (the 1-minute load average), and at least 1.

    llama.cpp's threads meet at a barrier after every graph node, so one thread waiting for a core stalls the
    others: on a 2-core machine under load ~10, SmolLM2 generated 37.9 tok/s with 1 thread and 9.2 with 2, and
    with 4 more spinning processes 4.2 against 0.2 (benchmarks/threads.py, results/cpu-2core-threads-*.json),
    while on the idle machine 2 threads win (112 vs 68 tok/s, issue 19). Hyperthreads share a core's vector
    units, so they count once (llama.cpp's own default). The load is read when the Context is made; pass
    n_threads= to fix the number."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:  # no topology (some containers): count logical CPUs
            cores.add(("cpu", str(cpu)))
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - load average unavailable
        busy = 0.0
    return max(1, min(len(cores), int(len(cpus) - busy + 0.5)))


def _positive_int(name: str, value: object, upper: int) -> int:
    return integer(name, value, 1, upper)


def _thread_pool_functions() -> tuple[CData, CData]:
    new = cpu_backend_function("ggml_threadpool_new", "struct ggml_threadpool *(*)(struct ggml_threadpool_params *)")
    free = cpu_backend_function("ggml_threadpool_free", "void (*)(struct ggml_threadpool *)")
    return new, free


def _attach_thread_pools(handle: CData, n_threads: int, n_threads_batch: int) -> list[CData]:
    new, _ = _thread_pool_functions()
    pools = []
    for n in dict.fromkeys((n_threads, n_threads_batch)):  # one pool per distinct thread count
        params = ffi.new("struct ggml_threadpool_params *", C.ggml_threadpool_params_default(n))
        pool = new(params)
        if pool == ffi.NULL:
            raise OutOfMemoryError(f"could not start a pool of {n} CPU threads")
        pools.append(pool)
    C.llama_attach_threadpool(handle, pools[0], pools[-1])
    return pools


def _free_context(handle: CData, pools: list[CData]) -> None:
    C.llama_free(handle)  # first: the context's backend still points at the pools
    _, free = _thread_pool_functions()
    for pool in pools:
        free(pool)


def _raise_flag(flag: CData) -> None:
    flag[0] = 1


def common_prefix_length(a: Sequence[int], b: Sequence[int], start: int = 0, limit: int | None = None) -> int:
    """How many leading tokens a and b share (at most `limit`), given that the first `start` match."""
    n = start
    end = min(len(a), len(b)) if limit is None else limit
    while n < end and a[n] == b[n]:
        n += 1
    return n


_Args = ParamSpec("_Args")
_Result = TypeVar("_Result")


def exclusive(method: Callable[Concatenate[Context, _Args], _Result]) -> Callable[Concatenate[Context, _Args], _Result]:
    """Run a Context method only when no other thread is using the context (else BusyError, never a corrupted
    cache) and inside a use of it (close() from another thread waits for the call to return). Calls nest, and
    the thread running a generation held on the context may make them (see context_lock)."""
    def run(self: Context, /, *args: _Args.args, **kwargs: _Args.kwargs) -> _Result:
        claim = self._claim
        claim.enter_call()
        try:
            with self._lifetime:
                return method(self, *args, **kwargs)
        finally:
            claim.exit_call()
    functools.update_wrapper(run, method)  # what @functools.wraps does; its result would type as _Wrapped
    return run


class Context(NativeObject):
    """The KV cache and compute buffers for running a model.

    n_ctx: context length in tokens (0 = the model's trained length; default min(4096, trained)).
    n_batch: most tokens one `decode` call hands to llama.cpp; n_ubatch: tokens computed at once.
    n_threads / n_threads_batch: threads for generation / prompt processing (default: default_threads(), one per
    physical core less the cores the load average says are busy, at least 1).
    flash_attn: "auto", True or False. type_k / type_v: KV-cache types ("f16", "q8_0", ...).
    """

    _closed_message = "this Context is closed (or its Model was closed); create a new one"

    def __init__(self, model: Model, *, n_ctx: int | None = None, n_batch: int = 2048, n_ubatch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None, flash_attn: bool | str = "auto",
                 type_k: str = "f16", type_v: str = "f16", n_seq_max: int = 1,
                 extra_params: Mapping[str, object] | None = None, lora: Mapping[LoRA, float] | None = None) -> None:
        # Who may use the context (context_lock); set first: set_lora below is such a use.
        self._claim = ContextLock()
        if model.dry_run:
            raise InvalidParameterError("this Model comes from a dry run (no weights in memory): it can be "
                                        "inspected, not run; load it with llmplace.load(path)")
        if model.vocab_only:
            # llama.cpp creates the context, then aborts the process at its first decode (no weights, no backends)
            raise InvalidParameterError("this Model was loaded with vocab_only=True (a tokenizer, no weights): it "
                                        "can tokenize, not run; load it without vocab_only to create a Context")
        if n_ctx is None:
            n_ctx = model.default_n_ctx  # load(n_ctx=...), or the context size the memory fit chose
        if n_ctx is None:
            n_ctx = min(DEFAULT_N_CTX, model.n_ctx_train) if model.n_ctx_train > 0 else DEFAULT_N_CTX
        if n_ctx != 0:
            _positive_int("n_ctx", n_ctx, MAX_N_CTX)
        _positive_int("n_batch", n_batch, MAX_N_CTX)
        _positive_int("n_ubatch", n_ubatch, MAX_N_CTX)
        _positive_int("n_seq_max", n_seq_max, MAX_SEQ)
        # llama.cpp reserves logits for min(n_ctx, n_batch) outputs and at least one per sequence: more sequences
        # than that abort the process at the first decode (GGML_ASSERT in output_reserve)
        outputs = min(n_batch, n_ctx or model.n_ctx_train or n_batch)
        if n_seq_max > outputs:
            raise InvalidParameterError(f"n_seq_max={n_seq_max} is more sequences than llama.cpp reserves outputs for "
                                        f"(n_batch={n_batch}, at most n_ctx={n_ctx}): raise n_batch and n_ctx to at "
                                        f"least {n_seq_max}, or lower n_seq_max")
        n_threads = _positive_int("n_threads", default_threads() if n_threads is None else n_threads, 1024)
        n_threads_batch = _positive_int("n_threads_batch", n_threads if n_threads_batch is None else n_threads_batch,
                                        1024)
        if flash_attn not in _FLASH_ATTN:
            raise InvalidParameterError(f"flash_attn must be 'auto', True or False, not {flash_attn!r}")
        for name, value in (("type_k", type_k), ("type_v", type_v)):
            if value not in KV_TYPES:
                raise InvalidParameterError(f"{name} must be one of {sorted(KV_TYPES)}, not {value!r}")
        if model.split.mode == "tensor":
            # llama.cpp's tensor split computes attention only through flash attention, and DESIGN §6 records
            # that it does not take a quantized KV cache; both would fail late or abort, so refuse here.
            if flash_attn is False:
                raise InvalidParameterError("this model is loaded with tensor split, which needs flash attention: "
                                            "pass flash_attn=True or 'auto', or load with split_mode='layer'")
            if type_k not in ("f32", "f16", "bf16") or type_v not in ("f32", "f16", "bf16"):
                raise InvalidParameterError(f"tensor split does not take a quantized KV cache (type_k={type_k!r}, "
                                            f"type_v={type_v!r}): use 'f16', or load with split_mode='layer'")
        if flash_attn is False and type_v not in ("f32", "f16", "bf16"):
            raise InvalidParameterError(f"a quantized V cache (type_v={type_v!r}) needs flash attention: pass "
                                        "flash_attn=True or 'auto', or type_v='f16'")

        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        params.type_k = KV_TYPES[type_k]
        params.type_v = KV_TYPES[type_v]
        params.no_perf = False
        # Other llama_context_params fields (rope/YaRN scaling, pooling, embeddings ...) by their C names:
        # what the llama-cpp-python drop-in passes through, each checked against its C type and enumerators.
        set_fields(params, extra_params or {}, EXTRA_PARAMS, "extra_params")
        # Set by abort() (and close()) from any thread; read by the shim's C abort callback at every graph node.
        self._abort_flag = ffi.new("int *", 0)
        params.abort_callback = C.llmplace_abort_if_flag_set
        params.abort_callback_data = self._abort_flag

        # Inside a use of the model: Model.close() from another thread waits for the context to exist (and
        # be listed in model._contexts, which it closes first) instead of freeing the model under it.
        def creation_error(reason: str) -> Exception:
            if reason != NO_REASON and not any(word in reason.lower() for word in ("alloc", "memory", "buffer")):
                # every value was range-checked above, so this is a combination llama.cpp refuses
                return InvalidParameterError(f"llama.cpp refused to create a context with n_ctx={n_ctx}, "
                                             f"n_batch={n_batch}, n_seq_max={n_seq_max}, extra_params="
                                             f"{dict(extra_params or {})}: {reason}")
            return OutOfMemoryError(
                f"llama.cpp could not create a context with n_ctx={n_ctx}, n_batch={n_batch}: {reason}. "
                "Try a smaller n_ctx or n_batch, or a quantized KV cache (type_k='q8_0', type_v='q8_0').")

        with model._lifetime:
            handle = native_call(C.llama_init_from_model, model._ptr, params, error=creation_error)
            try:
                pools = _attach_thread_pools(handle, n_threads, n_threads_batch)
            except BaseException:
                C.llama_free(handle)
                raise
            self._own(handle, _free_context, pools, interrupt=functools.partial(_raise_flag, self._abort_flag))
            self._pools = pools  # [generation pool, batch pool (if another thread count)]
            # Sizes read now: once model._contexts lists it, a Model.close() may free it at any time.
            n_batch = C.llama_n_batch(handle)
            self._n_ctx: int = C.llama_n_ctx(handle)  # fixed for its life, as n_batch
            causal, n_ubatch = bool(C.llama_get_causal_attn(handle)), C.llama_n_ubatch(handle)
            model._contexts.add(self)
        # (above) A persistent CPU thread pool: without one, ggml creates and joins a throw-away pool at every
        # graph computation, i.e. every generated token.
        self.model = model
        # Tokens held in the KV cache for sequence 0, in order: lets a new prompt reuse a cached prefix.
        self.tokens: list[int] = []
        # What speculative decoding learned about this context that outlives one call: the batch sizes it
        # has run (a GPU backend compiles, captures and caches per shape and context) and whether its
        # backend pays for a shape's first runs (speculative.DepthController).
        self.speculation_memory: dict[str, Any] = {}
        # llama.cpp may lower n_batch (never above n_ctx); decode() must split by the value in force, since
        # a larger batch fails an assertion that aborts the process.
        self._token_buf = ffi.new("llama_token[]", n_batch)
        # decode_one's batch: the first token of _token_buf, no positions (llama.cpp continues sequence 0).
        # llama_decode takes the batch by value, so one struct serves every call.
        self._one_token_batch = C.llama_batch_get_one(self._token_buf, 1)
        # Non-causal attention (embedding models, attention_type=1) computes a sequence in one micro-batch:
        # llama.cpp aborts the process on a decode of more tokens than n_ubatch.
        self._causal = causal
        self._max_decode = n_batch if causal else n_ubatch
        self._batch = None  # a llama_batch with per-token logits flags, made by the first decode_all
        # Rows of output (logits, embeddings) the last decode produced: what embeddings() may read. In embedding
        # mode llama.cpp outputs every token of a decode, otherwise those the batch asks for.
        self._outputs_all = bool(params.embeddings)
        self._n_outputs = 0
        self.lora: dict[LoRA, float] = {}
        if lora:
            self.set_lora(lora)

    @exclusive
    def set_lora(self, adapters: Mapping[LoRA, float]) -> None:
        """Apply these LoRA adapters ({adapter: scale}, from model.load_lora) from the next decode on; {} for none.
        The KV cache is cleared: what it holds was computed with the previous weights."""
        from . import lora as lora_module

        lora_module.apply(self._ptr, self.model, adapters)
        self.lora = dict(adapters)
        self.clear()

    # ---- sizes ----
    @property
    def n_ctx(self) -> int:
        self._ptr  # noqa: B018 - ClosedError on a closed context, as before
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        with self._lifetime:
            value: int = C.llama_n_batch(self._ptr)
            return value

    @property
    def n_ubatch(self) -> int:
        with self._lifetime:
            value: int = C.llama_n_ubatch(self._ptr)
            return value

    @property
    def n_threads(self) -> int:
        with self._lifetime:
            value: int = C.llama_n_threads(self._ptr)
            return value

    # ---- the KV cache ----
    @exclusive
    def clear(self) -> None:
        """Forget every token in the KV cache."""
        C.llama_memory_clear(C.llama_get_memory(self._ptr), True)
        self.tokens.clear()

    @exclusive
    def reuse_prefix(self, tokens: Sequence[int], keep_last: int = 1, known: int = 0) -> int:
        """Keep the longest cached prefix of `tokens`, leaving at least `keep_last` of them to compute (the
        last prompt token must be decoded again for its logits); drop the rest of the cache. Returns the
        number of tokens reused. known: a length of prefix the caller knows to match (comparing starts there).
        Every reuse of cached tokens (generation, Chat, the drop-in, a draft model's context) goes through here."""
        limit = min(len(self.tokens), len(tokens) - keep_last)
        cached = common_prefix_length(self.tokens, tokens, min(known, limit), limit)
        self.truncate(cached)
        return cached

    @exclusive
    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep tokens of sequence 0 in the KV cache, drop the rest."""
        n_keep = integer("n_keep", n_keep, 0, INT32[1])
        if n_keep >= len(self.tokens):
            return
        if not C.llama_memory_seq_rm(C.llama_get_memory(self._ptr), 0, n_keep, -1):
            # Some memories (recurrent models) cannot drop a suffix: start over.
            self.clear()
            return
        del self.tokens[n_keep:]

    # ---- decoding ----
    @exclusive
    def decode(self, tokens: Sequence[int]) -> None:
        """Append tokens to sequence 0 and compute them, n_batch at a time; logits are kept for the last one.

        Raises ContextOverflowError (before computing anything) when they do not fit in n_ctx.
        """
        ptr = self._ptr
        n = len(tokens)
        if n == 0:
            raise InvalidParameterError("decode needs at least one token")
        if len(self.tokens) + n > self.n_ctx:
            raise ContextOverflowError(
                f"{len(self.tokens)} cached + {n} new tokens exceed the context of {self.n_ctx} tokens; "
                "create the Context with a larger n_ctx, shorten the prompt, or clear() the context")
        self._check_tokens(tokens)
        if not self._causal and n > self._max_decode:
            raise InvalidParameterError(
                f"this context uses non-causal attention (an embedding model, or attention_type=1), which computes "
                f"all tokens of a decode at once: {n} tokens do not fit its n_ubatch of {self._max_decode}; create "
                "the Context with n_ubatch and n_batch of at least the longest input")
        n_batch = len(self._token_buf)
        self._start_decode()
        base = len(self.tokens)
        try:
            for start in range(0, n, n_batch):
                chunk = tokens[start:start + n_batch]
                self._token_buf[0:len(chunk)] = chunk
                self._n_outputs = 0
                rc = C.llama_decode(ptr, C.llama_batch_get_one(self._token_buf, len(chunk)))
                if rc == 2 or rc < -1:
                    # Aborted or failed part way: llama.cpp keeps the micro-batches it finished. Re-read
                    # where sequence 0 ends so `tokens` stays true to the cache.
                    kept = C.llama_memory_seq_pos_max(C.llama_get_memory(ptr), 0) + 1
                    self.tokens.extend(chunk[:max(0, kept - len(self.tokens))])
                check(rc, "llama_decode")
                self.tokens.extend(chunk)
                # Rows of output this decode left: every token's in embedding mode, else the last one's.
                self._n_outputs = len(chunk) if self._outputs_all else 1
        except KeyboardInterrupt:
            self._resync(tokens, base)
            raise

    @exclusive
    def decode_one(self, token: int) -> None:
        """Append one token and compute it (the generation hot path: no validation beyond n_ctx)."""
        self._decode_one(token)

    def _decode_one(self, token: int) -> None:
        """decode_one for a caller already inside a use of the context (the generation loop, one use per step,
        see context_lock.GenerationHold): no lock per token, and the one-token batch is built once."""
        ptr = self._ptr  # raises ClosedError on a closed context
        tokens = self.tokens
        base = len(tokens)
        if base >= self._n_ctx:
            raise ContextOverflowError(f"the context of {self._n_ctx} tokens is full; create the Context with a "
                                       "larger n_ctx or clear() it")
        try:
            self._token_buf[0] = token
        except (OverflowError, TypeError):
            raise InvalidParameterError(f"token id {token!r} is outside the vocabulary (0 .. "
                                        f"{self.model.n_vocab - 1})") from None
        try:
            self._n_outputs = 0
            rc = C.llama_decode(ptr, self._one_token_batch)
            if rc:
                check(rc, "llama_decode")
            self._n_outputs = 1
            tokens.append(token)
        except KeyboardInterrupt:
            self._resync([token], base)
            raise

    @exclusive
    def decode_media(self, placeholders: Sequence[int], evaluate: Callable[[CData, int], None]) -> None:
        """Append positions whose embeddings `evaluate(context pointer, n_past)` decodes into sequence 0 from
        position n_past on (an image, through libmtmd: llmplace.images), and record them in `tokens` as
        `placeholders` (negative ids, which no vocabulary has: prefix reuse then matches them only against the
        same image at the same place). `evaluate` raises on failure; the positions it decoded are then dropped
        again, so `tokens` stays true to the cache. ContextOverflowError before anything is computed when they
        do not fit."""
        ptr = self._ptr
        n = len(placeholders)
        if len(self.tokens) + n > self._n_ctx:
            raise ContextOverflowError(
                f"{len(self.tokens)} cached tokens + an image of {n} tokens exceed the context of {self._n_ctx} "
                "tokens; create the Context (or Llama) with a larger n_ctx, or send fewer or smaller images")
        memory = C.llama_get_memory(ptr)
        # The next position from the cache, not len(tokens): a model with M-RoPE places an image's tokens on
        # fewer positions than it has tokens.
        n_past = C.llama_memory_seq_pos_max(memory, 0) + 1
        self._start_decode()
        self._n_outputs = 0
        try:
            evaluate(ptr, n_past)
        except BaseException:
            C.llama_memory_seq_rm(memory, 0, n_past, -1)
            raise
        self.tokens.extend(placeholders)

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        n_vocab = self.model.n_vocab
        bad = next((t for t in tokens if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                    or not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"token id {bad!r} is outside the vocabulary (0 .. {n_vocab - 1})")

    def _resync(self, tokens: Sequence[int], base: int) -> None:
        """After Ctrl-C in a decode: Python raises KeyboardInterrupt as soon as llama_decode returns, before
        `tokens` records what it computed. Re-read where sequence 0 ends so `tokens` stays true to the cache
        (else the next prompt's cached prefix is wrong). `base`: len(self.tokens) when the decode began."""
        kept = C.llama_memory_seq_pos_max(C.llama_get_memory(self._ptr), 0) + 1
        self.tokens[base:] = list(tokens[:max(0, kept - base)])

    @exclusive
    def decode_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Append up to n_batch tokens to sequence 0 in ONE llama_decode call, with logits for every one of
        them: returns a float32 [len(tokens), n_vocab] copy (row i predicts the token after tokens[i]).

        What speculative decoding verifies a draft with. No validation beyond n_ctx and n_batch: callers
        pass token ids they got from this model's vocabulary.
        """
        ptr = self._ptr
        n = len(tokens)
        if not 1 <= n <= self._max_decode:
            raise InvalidParameterError(f"decode_all takes 1 to {self._max_decode} tokens (n_batch, or n_ubatch for "
                                        f"non-causal attention), got {n}")
        self._check_tokens(tokens)
        if len(self.tokens) + n > self.n_ctx:
            raise ContextOverflowError(f"{len(self.tokens)} cached + {n} new tokens exceed the context of "
                                       f"{self.n_ctx} tokens")
        batch = self._batch
        if batch is None:
            # llama_batch_get_one asks for the last token's logits only; a batch of our own says per token.
            batch = self._batch = C.llama_batch_init(len(self._token_buf), 0, 1)
            self._batch_finalizer = weakref.finalize(self, C.llama_batch_free, batch)
        pos0 = len(self.tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        self._start_decode()
        self._n_outputs = 0
        rc = C.llama_decode(ptr, batch)
        if rc != 0:
            # Aborted or failed: drop whatever part of the batch reached the cache, so `tokens` stays true.
            C.llama_memory_seq_rm(C.llama_get_memory(ptr), 0, pos0, -1)
        check(rc, "llama_decode")
        self._n_outputs = n
        self.tokens.extend(tokens)
        n_vocab = self.model.n_vocab
        # Rows come back in batch order (llama_get_logits undoes any reordering of the outputs).
        rows: np.ndarray = np.frombuffer(ffi.buffer(C.llama_get_logits(ptr), n * n_vocab * 4), dtype=np.float32
                                         ).reshape(n, n_vocab).copy()
        return rows

    # ---- several sequences (llmplace.engine) ----
    # The methods above work on sequence 0 (`tokens`). These address any sequence of a context made with
    # n_seq_max > 1; the caller keeps track of which tokens each sequence holds. Sequence 0 stays in step with
    # `tokens` when they touch it. Every value llama.cpp checks by aborting the process (a seq_id out of range,
    # a partial copy between the per-sequence caches of a non-unified context, a batch over n_batch) is
    # checked here first and raises a typed error.

    def _seq_id(self, name: str, seq_id: object) -> int:
        return integer(name, seq_id, 0, C.llama_n_seq_max(self._ptr) - 1,
                       " (a sequence id below the context's n_seq_max)")

    @property
    def n_seq_max(self) -> int:
        with self._lifetime:
            value: int = C.llama_n_seq_max(self._ptr)
            return value

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold: n_ctx when the KV cache is unified (shared by all sequences),
        n_ctx / n_seq_max (rounded up by llama.cpp) when each sequence has a cache of its own."""
        with self._lifetime:
            value: int = C.llama_n_ctx_seq(self._ptr)
            return value

    @exclusive
    def sequence_length(self, seq_id: int) -> int:
        """How many positions sequence `seq_id` holds in the KV cache (0 when empty)."""
        seq_id = self._seq_id("seq_id", seq_id)
        length: int = C.llama_memory_seq_pos_max(C.llama_get_memory(self._ptr), seq_id) + 1
        return length

    @exclusive
    def remove_sequence(self, seq_id: int) -> None:
        """Forget every token of sequence `seq_id` (its cells become free for other sequences)."""
        seq_id = self._seq_id("seq_id", seq_id)
        C.llama_memory_seq_rm(C.llama_get_memory(self._ptr), seq_id, -1, -1)  # a whole sequence never fails
        if seq_id == 0:
            self.tokens.clear()

    @exclusive
    def truncate_sequence(self, seq_id: int, n_keep: int) -> int:
        """Keep the first n_keep positions of sequence `seq_id`, drop the rest. Returns the positions kept:
        n_keep, or 0 when the memory cannot drop a suffix (recurrent models), which empties the sequence."""
        seq_id = self._seq_id("seq_id", seq_id)
        n_keep = integer("n_keep", n_keep, 0, INT32[1])
        memory = C.llama_get_memory(self._ptr)
        length: int = C.llama_memory_seq_pos_max(memory, seq_id) + 1
        if n_keep >= length:
            return length
        if not C.llama_memory_seq_rm(memory, seq_id, n_keep, -1):
            C.llama_memory_seq_rm(memory, seq_id, -1, -1)
            n_keep = 0
        if seq_id == 0:
            del self.tokens[n_keep:]
        return n_keep

    @exclusive
    def copy_sequence(self, src: int, dst: int, n: int, tokens: Sequence[int] | None = None) -> int:
        """Make sequence `dst` hold the first `n` positions of sequence `src` (what dst held before is dropped),
        without computing anything: a shared prompt prefix is computed once. Returns the positions copied: n,
        or 0 when the memory cannot cut a sequence (recurrent models), which leaves dst empty. tokens: the
        tokens copied, needed when dst is 0 (they become `tokens`).

        In a unified KV cache the cells are shared (no copy); with a cache per sequence llama.cpp copies the
        whole cache of src at the next decode (it refuses a partial copy by aborting), and the positions from
        n on are then dropped from dst."""
        src, dst = self._seq_id("src", src), self._seq_id("dst", dst)
        if src == dst:
            raise InvalidParameterError(f"copy_sequence needs two different sequences, got src = dst = {src}")
        memory = C.llama_get_memory(self._ptr)
        length = C.llama_memory_seq_pos_max(memory, src) + 1
        n = integer("n", n, 0, length, f" (sequence {src} holds {length} positions)")
        if dst == 0:
            if tokens is None or len(tokens) < n:
                raise InvalidParameterError("copying into sequence 0 needs tokens= (the n tokens copied): "
                                            "Context.tokens lists what sequence 0 holds")
            self._check_tokens(tokens[:n])
        C.llama_memory_seq_rm(memory, dst, -1, -1)
        if dst == 0:
            self.tokens.clear()
        if n == 0:
            return 0
        if C.llama_n_ctx_seq(self._ptr) < C.llama_n_ctx(self._ptr):  # a cache per sequence: whole copies only
            C.llama_memory_seq_cp(memory, src, dst, -1, -1)
            if n < length and not C.llama_memory_seq_rm(memory, dst, n, -1):
                C.llama_memory_seq_rm(memory, dst, -1, -1)
                return 0
        else:
            C.llama_memory_seq_cp(memory, src, dst, 0, n)
        if dst == 0 and tokens is not None:  # checked above: given when dst is 0
            self.tokens.extend(int(t) for t in tokens[:n])
        return n

    @exclusive
    def decode_batch(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        """Compute tokens of several sequences in ONE llama_decode. entries: (seq_id, token, position,
        wants_logits), at most n_batch of them; each sequence's positions must continue it (the first is the
        number of positions it holds, the next ones follow by 1). Returns the batch index of each entry that
        wants logits, in order: what `logits(index)` and `Sampler.sample(context, index)` read, until the next
        decode. On a failure nothing of the batch stays in the cache (every sequence is cut back to where it
        was) and the typed error of `check` is raised."""
        ptr = self._ptr
        n = len(entries)
        if not 1 <= n <= self._max_decode:
            raise InvalidParameterError(f"decode_batch takes 1 to {self._max_decode} entries (n_batch, or n_ubatch "
                                        f"for non-causal attention), got {n}")
        memory = C.llama_get_memory(ptr)
        n_seq_max, n_ctx_seq, n_vocab = C.llama_n_seq_max(ptr), C.llama_n_ctx_seq(ptr), self.model.n_vocab
        starts: dict[int, int] = {}   # seq_id -> the position its first entry must have (what it held)
        following: dict[int, int] = {}  # seq_id -> the position its next entry must have
        outputs: list[int] = []
        batch = self._batch
        if batch is None:
            batch = self._batch = C.llama_batch_init(len(self._token_buf), 0, 1)
            self._batch_finalizer = weakref.finalize(self, C.llama_batch_free, batch)
        for i, entry in enumerate(entries):
            try:
                seq_id, token, position, wants_logits = entry
            except (TypeError, ValueError):
                raise InvalidParameterError(f"decode_batch entry {i} must be (seq_id, token, position, "
                                            f"wants_logits), not {entry!r}") from None
            seq_id = integer(f"entries[{i}] seq_id", seq_id, 0, n_seq_max - 1,
                             f" (the context was created with n_seq_max={n_seq_max})")
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < n_vocab:
                raise InvalidParameterError(f"entries[{i}]: token id {token!r} is outside the vocabulary "
                                            f"(0 .. {n_vocab - 1})")
            expected = following.get(seq_id)
            if expected is None:
                expected = starts[seq_id] = C.llama_memory_seq_pos_max(memory, seq_id) + 1
            if isinstance(position, bool) or not isinstance(position, numbers.Integral) or position != expected:
                raise InvalidParameterError(
                    f"entries[{i}]: sequence {seq_id} continues at position {expected}, not {position!r} (positions "
                    "follow on from what the sequence holds, one by one)")
            if position >= n_ctx_seq:
                raise ContextOverflowError(f"entries[{i}]: position {position} is beyond what one sequence of this "
                                           f"context holds ({n_ctx_seq} tokens); create it with a larger n_ctx")
            following[seq_id] = expected + 1
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = 1 if wants_logits else 0
            if wants_logits:
                outputs.append(i)
        batch.n_tokens = n
        self._start_decode()
        self._n_outputs = 0
        rc = C.llama_decode(ptr, batch)
        if rc != 0:
            for seq_id, start in starts.items():
                C.llama_memory_seq_rm(memory, seq_id, start, -1)
        check(rc, "llama_decode")
        self._n_outputs = len(outputs)
        if 0 in starts:
            self.tokens.extend(int(e[1]) for e in entries if e[0] == 0)
        return outputs

    @exclusive
    def synchronize(self) -> None:
        """Wait until the device has finished the decodes handed to it (GPU decoding is asynchronous: a
        decode call can return before the work is done; reading logits or sampling waits implicitly)."""
        C.llama_synchronize(self._ptr)

    def _start_decode(self) -> None:
        """Clear an abort left from before this decode, unless close() has begun (it raised the flag to stop a
        decode in flight: this one must not run to its end while close() waits for it)."""
        self._abort_flag[0] = 0
        if self._lifetime.closing:
            from .errors import ClosedError

            raise ClosedError(self._closed_message)

    @exclusive
    def logits(self, index: int = -1, *, copy: bool = True) -> np.ndarray:
        """The logits of the last decoded token (index -1; i for output i of the last decode), as a
        float32[n_vocab] copy. Always a copy: llama.cpp reallocates its output buffer when a decode needs more
        rows and frees it with the context, so a view kept by the caller would read freed memory. To change
        what a sampler draws from (a logits processor), edit the copy and hand it to `set_logits`."""
        if copy is not True:
            raise InvalidParameterError("logits(copy=False) is gone: a view of llama.cpp's buffer outlived it (the "
                                        "next decode may reallocate it, close() frees it); use logits(), and "
                                        "set_logits(values) to change what the sampler draws from")
        row: np.ndarray = np.frombuffer(ffi.buffer(self._logits_row(index), self.model.n_vocab * 4),
                                        dtype=np.float32).copy()
        return row

    @exclusive
    def set_logits(self, values: npt.ArrayLike, index: int = -1) -> None:
        """Replace the logits of output `index` of the last decode (what the next `Sampler.sample` draws from)
        with `values` (n_vocab numbers, or one number for all)."""
        n_vocab = self.model.n_vocab
        try:
            array = np.ascontiguousarray(np.broadcast_to(np.asarray(values, dtype=np.float32), (n_vocab,)))
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"logits must be {n_vocab} numbers (one per token of the vocabulary), "
                                        f"not {type(values).__name__} of shape {np.shape(values)}: {exc}") from None
        ffi.memmove(self._logits_row(index), ffi.from_buffer(array), n_vocab * 4)

    def _logits_row(self, index: int) -> CData:
        ptr = C.llama_get_logits_ith(self._ptr, integer("index", index, *INT32))
        if ptr == ffi.NULL:
            raise InvalidParameterError(f"no logits for output {index}: decode tokens first")
        return ptr

    @exclusive
    def embeddings(self, n_tokens: int = 1) -> np.ndarray:
        """Embeddings computed by the last decode of a context created with extra_params={"embeddings": True}:
        the pooled vector of sequence 0 (float32[n_embd]; for rank pooling, a reranker's n_cls_out scores) when
        the context pools, else one row for each of the last `n_tokens` tokens of that decode
        (float32[n_tokens, n_embd]), at most the tokens that decode computed (a decode() longer than n_batch
        leaves its last n_batch). Always a copy."""
        ptr = self._ptr
        n_embd = C.llama_model_n_embd_out(self.model._ptr)  # the width of llama.cpp's output rows
        pooled = C.llama_pooling_type(ptr) != C.LLAMA_POOLING_TYPE_NONE
        if pooled:
            data = C.llama_get_embeddings_seq(ptr, 0)
            rows = 1
            if C.llama_pooling_type(ptr) == C.LLAMA_POOLING_TYPE_RANK:
                # a reranker's scores: llama.cpp keeps n_cls_out floats per sequence, not n_embd (reading n_embd
                # returned memory from past their end)
                n_embd = max(1, C.llama_model_n_cls_out(self.model._ptr))
        else:
            data = C.llama_get_embeddings(ptr)
            rows = integer("n_tokens", n_tokens, 1, INT32[1])
            if data != ffi.NULL and rows > self._n_outputs:
                raise InvalidParameterError(
                    f"n_tokens={rows}, but the last decode left embeddings for {self._n_outputs} token(s): ask for "
                    "at most that many (decode() keeps its last n_batch tokens' rows; decode the text first)")
        if data == ffi.NULL:
            raise InvalidParameterError("no embeddings: create the Context with extra_params={'embeddings': True} "
                                        "and decode tokens first")
        # llama.cpp keeps the rows in batch order: the last n_tokens rows are the decode's last tokens.
        first_row = 0 if pooled else self._n_outputs - rows
        values: np.ndarray = np.frombuffer(ffi.buffer(data + first_row * n_embd, rows * n_embd * 4), dtype=np.float32)
        values = values.reshape(rows, n_embd).copy()
        return values[0] if pooled else values

    def abort(self) -> None:
        """Ask a decode running in another thread to stop after its current micro-batch (raises AbortedError
        there). Thread-safe."""
        self._abort_flag[0] = 1

    def _interrupt_calls(self) -> None:
        # close() from another thread: stop a decode in flight at its next graph node rather than wait for it
        _raise_flag(self._abort_flag)

    def perf(self) -> dict[str, float]:
        """llama.cpp's own timings for this context: prompt/generation milliseconds and token counts."""
        with self._lifetime:
            data = C.llama_perf_context(self._ptr)
        return {"prompt_ms": data.t_p_eval_ms, "prompt_tokens": data.n_p_eval,
                "eval_ms": data.t_eval_ms, "eval_tokens": data.n_eval}

    # ---- saving and restoring ----
    @exclusive
    def save_state(self) -> bytes:
        """The whole state (KV cache and last outputs; samplers are separate) as bytes, for `load_state` on a
        context of the same model and size. `tokens` says which tokens it holds."""
        ptr = self._ptr
        size = C.llama_state_get_size(ptr)
        buf = ffi.new("uint8_t[]", size)
        n = C.llama_state_get_data(ptr, buf, size)
        state: bytes = ffi.buffer(buf, n)[:]
        return state

    @exclusive
    def load_state(self, data: bytes, tokens: Sequence[int]) -> None:
        """Restore a state from `save_state`; `tokens` are the tokens it holds (they become `self.tokens`)."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
            raise InvalidParameterError(f"a saved state is the non-empty bytes save_state returned, not "
                                        f"{type(data).__name__ if data is not None else None}"
                                        f"{' (empty)' if isinstance(data, (bytes, bytearray, memoryview)) else ''}")
        tokens = [integer("token id", t, 0, INT32[1]) for t in tokens]
        buf = ffi.from_buffer("uint8_t[]", data)
        self._n_outputs = 0  # a restored state's outputs are not known here: decode before reading embeddings
        size = len(buf)

        def refused(reason: str) -> InvalidParameterError:
            self.clear()  # a partial restore leaves the cache in no known state
            return InvalidParameterError(f"this state does not fit this context ({reason}); the context was cleared")

        native_call(C.llama_state_set_data, self._ptr, buf, size, failed=lambda n: n != size, error=lambda reason:
                    refused(f"llama.cpp: {reason}; saved from another model, context size or KV-cache type?"))
        # The token list says what the cache holds (prefix reuse trusts it): one position per token, fewer for
        # models whose images take fewer positions than tokens (M-RoPE).
        positions = C.llama_memory_seq_pos_max(C.llama_get_memory(self._ptr), 0) + 1
        compressed = C.llama_model_rope_type(self.model._ptr) in (C.LLAMA_ROPE_TYPE_MROPE, C.LLAMA_ROPE_TYPE_IMROPE)
        if positions > len(tokens) or (positions != len(tokens) and not compressed):
            raise refused(f"the state holds {positions} positions but its token list has {len(tokens)} tokens: "
                          "pass the tokens save_state was taken with")
        self.tokens = tokens

