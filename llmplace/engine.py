"""The batching engine: one model, one context holding several sequences, decoded together (continuous batching).

    with llmplace.Engine(model, slots=4, n_ctx=2048) as engine:
        handles = [engine.submit(prompt, max_tokens=64, temperature=0) for prompt in prompts]
        for step in handles[0]:                 # GenerationSteps, as stream_generate yields them
            print(step.text, end="")
        replies = [h.result() for h in handles] # Generation objects, as generate returns them

A scheduler thread owns the context. At every step it admits waiting requests into free slots, decodes one
token for each generating sequence, prefills a piece of each waiting prompt, and draws each sequence's next
token with that sequence's own sampler chain (temperature, seed, penalties ...), grammar, stop strings and
limits (`token_loop.SequenceState`), and keeps the logits it drew from when asked (keep_logits, what
logprobs are computed from) and its logits processor. Not per request yet: stopping criteria and echo (the
drop-in Llama serves those). A request joins at the next step and leaves as soon as it ends or is cancelled.

Equal to one request run alone. What the engine must keep is that batching does not change what a request
produces: on the CPU a sequence's greedy tokens equal `generate` of the same prompt token for token. ggml's
CPU kernels compute each row of a micro-batch on its own, but some choose their algorithm by the shape of the
micro-batch, and the attention kernels' rounding depends on where a sequence's tokens lie in the KV cache. So:
- each sequence has a KV cache of its own (a non-unified cache, one "stream" per slot): its tokens lie in
  cells 0, 1, 2 ... as they do in a context of its own, whatever the other sequences hold. (A unified cache
  interleaves the sequences' cells, which changes how the attention sums are grouped.)
- a prompt is prefilled in pieces cut at the boundaries of the micro-batches a lone `generate` computes it in
  (multiples of PREFILL_UNIT from position 0), each piece a decode of its own, and a piece never has fewer
  rows than the kernels of its lone micro-batch need (ROW_CLASSES: flash attention's tiled kernel from 64
  rows, the tiled K-quant product from 8, sgemm from 2).
- one generated token per sequence is decoded for all generating sequences in one decode, except a sequence
  attending to SPLIT_KV_CELLS cells or more: alone, one query over that many cells takes the kernel that
  splits the cells across threads, so such a sequence gets a decode of its own.
- whether a batch of rows gets the logits each row gets alone also depends on the weights' types: llama.cpp
  computes a matrix product of one row with ggml's dot products and of several rows with llamafile's sgemm
  for some types (F32, F16, BF16, Q8_0, Q4_0 ...), and the tiled K-quant product from 8 rows on. The engine
  probes this once, when it starts (`batched`): when a batch of rows is not bit for bit equal to one row, or
  the model is a mixture of experts (a batch routes rows of several sequences to the experts together, and
  the tiny test MoE's greedy output then differed from a lone run's after a few tokens, though a probe of
  equal rows was equal), each sequence's token gets a decode of its own (exact=True, the default; the
  steps still interleave, but batching then saves nothing), or is batched all the same (exact=False:
  faster, output may differ from a lone run at near-ties, as on a GPU).
- a shared prefix (from a live or finished slot, `Context.copy_sequence`) is cut so that the rest of the
  prompt is computed in pieces of the same kinds as alone.
On a GPU the kernels differ between batch shapes anyway (see README, speculative decoding), so batched greedy
output may differ from a lone run at near-ties there, as it does for speculative decoding.

Sessions: more conversations than slots. `submit(..., session=id)` makes a request a turn of a conversation.
When it ends, the slot's cache (its prompt and reply) stays the session's while no other request needs that
slot; when one does, the least recently used session's KV state is saved to host memory
(llama_state_seq_get_data, `save_sequence`) and the slot given away. The session's next request restores the
state into a free slot (llama_state_seq_set_data, `restore_sequence`) when it holds more of the new prompt
than any slot does, and computes only the rest, with the same reuse rules (and so the same output) as a
cached prefix. The saved states together take at most max_session_bytes; beyond that the least recently used
are dropped, and state llama.cpp refuses to restore is dropped with a RuntimeWarning: such a turn is computed
from its prompt, which gives the same output. A restore puts the cells at 0, 1, 2 ... of the slot's own
cache, where a lone run has them. `sessions()` lists them, `drop_session(id)` forgets one.

Speculative decoding stays a single-sequence feature (`generate(..., draft=...)`): the engine refuses draft=
and lookup=, since verifying drafts of several sequences in one batch is not built.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, AsyncIterator, Generator, Iterator, Sequence

import numpy as np

from .compat.llama_grammar import GrammarConstraint
from ._ffi import C, ffi
from .context import Context, common_prefix_length, exclusive
from .errors import (BusyError, ClosedError, ContextOverflowError, InvalidParameterError, LlmplaceError,
                     unknown_keyword_error)
from .generation import Generation, GenerationStep, _new_step, _prompt_tokens
from .model import Model
from .native_errors import native_call
from .sampling import Sampler, SamplingParams
from .text_assembly import TextAssembler, stop_strings
from .token_loop import SequenceState, processed_logits

if TYPE_CHECKING:
    from .compat.llama_grammar import LlamaGrammar
    from .token_loop import LogitsProcessors

# The micro-batch size of a Context made by `generate` (Context's default n_ubatch): a lone run prefills its
# prompt in micro-batches [0, 512), [512, 1024) ...; the engine cuts prompts at the same boundaries.
PREFILL_UNIT: int = inspect.signature(Context).parameters["n_ubatch"].default
# ggml's CPU kernels choose their algorithm by how many rows of one sequence a micro-batch holds, and the
# algorithms round differently: flash attention takes its tiled kernel (float32 queries) from 64 query rows on,
# its one-row kernel (float16 queries) below (ops.cpp, GGML_FA_TILE_Q); the tiled K-quant matrix product runs
# from 8 rows on (tiled/tiled.cpp, ggml_tiled_min_batch); llamafile's sgemm from 2 rows on (sgemm.cpp), ggml's
# dot products for one. A row is computed exactly as alone only in a piece of the same class as the lone
# micro-batch that held it: the least number of rows of each class.
FA_TILE_ROWS = 64
ROW_CLASSES = (FA_TILE_ROWS, 8, 2, 1)
# llama.cpp pads the number of KV cells a decode attends to to a multiple of 256 (llama_kv_cache::get_n_kv);
# a single query over 512 cells or more takes the kernel that splits the cells across threads.
KV_PAD = 256
SPLIT_KV_CELLS = 512
DEFAULT_MAX_QUEUE = 1024
# Host memory the KV states of idle sessions may take together before the least recently used are dropped.
DEFAULT_MAX_SESSION_BYTES = 1 << 30
# The kernels a row of a KV cache was computed with: its piece's row class, or SPLIT for one row over 512
# cells or more. A cached row is reused for a new prompt only if a lone run computes it the same way.
SPLIT = 0

_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_SPECULATIVE = frozenset({"draft", "lookup", "depth", "adaptive_depth"})
CLOSED_WHILE_RUNNING = ("the Engine was closed (close() on it or on its Model) before this request finished; "
                        "its text so far is in the steps already received. Submit it to an open Engine")


def row_class(rows: int) -> int:
    """The least number of rows of the kernel class a piece of `rows` rows falls in (ROW_CLASSES)."""
    return next(least for least in ROW_CLASSES if rows >= least)


def prefill_pieces(start: int, n_prompt: int, limit: int) -> list[int]:
    """The ends of the pieces the engine prefills prompt positions [start, n_prompt) in: cut at the lone run's
    micro-batch boundaries (multiples of PREFILL_UNIT), pieces of at most `limit` tokens, except that no piece
    falls in a smaller row class than the lone micro-batch holding it (`exact_reuse` makes sure the part of a
    micro-batch to compute is never too short for that)."""
    ends = []
    position = start
    while position < n_prompt:
        first = position - position % PREFILL_UNIT
        end = min(first + PREFILL_UNIT, n_prompt)
        length = end - position
        count = max(1, min(-(-length // limit), length // row_class(end - first)))
        for i in range(1, count + 1):
            ends.append(position + length * i // count)
        position = end
    return ends


def piece_kind(start: int, length: int) -> int:
    """How a piece of `length` rows of one sequence, alone in its micro-batch, from `start`, is computed."""
    if length == 1 and start >= KV_PAD:
        return SPLIT
    return row_class(length)


def lone_kind(row: int, n_prompt: int) -> int:
    """How a lone `generate` computes prompt row `row` of an n_prompt-token prompt."""
    first = row - row % PREFILL_UNIT
    return piece_kind(row, min(first + PREFILL_UNIT, n_prompt) - first)


def exact_reuse(cached: int, n_prompt: int) -> int:
    """How many of `cached` prompt tokens (already in a cache) to keep so that the rest of the prompt is
    prefilled in pieces of the kinds a lone run computes it in: at most n_prompt - 1 (the last prompt token is
    computed for its logits), and leaving at least the least rows of the row class of the lone micro-batch
    it ends in."""
    cached = max(0, min(cached, n_prompt - 1))
    if cached == 0:
        return 0
    first = cached - cached % PREFILL_UNIT
    end = min(first + PREFILL_UNIT, n_prompt)
    return min(cached, end - row_class(end - first))


class EngineRequest:
    """A request submitted to an Engine: iterate it (in any thread) for its GenerationSteps as they come,
    `async for` them in asyncio, `result()` / `await` it for the Generation, `cancel()` it.

    Every iteration sees every step from the first. A request the engine could not run (closed, a decode
    failure) raises that typed error from iteration, result() and await, after the steps it did produce."""

    def __init__(self, engine: Engine, tokens: list[int], max_tokens: int, stops: list[str],
                 params: SamplingParams, sampler: Sampler, grammar: GrammarConstraint | None = None) -> None:
        self.tokens, self.max_tokens, self.stops, self.params = tokens, max_tokens, stops, params
        self._engine, self._sampler, self._grammar = engine, sampler, grammar
        # keep_logits: the logits each generated token was drawn from (before a grammar), float32[n_vocab] each
        self.logits_rows: list[np.ndarray] | None = None
        # logits_processor(input_ids, scores) -> scores, run on the scheduler thread
        self._processor: LogitsProcessors | None = None
        self._cond = threading.Condition()
        self._steps: list[GenerationStep] = []
        self._finished = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._waiters: list[_Waiter] = []   # (event loop, future) of async iterations waiting for a step
        self.session: str | None = None  # the id of the session it continues (submit(session=...))
        # Set by the scheduler thread only:
        self.slot: _Slot = _NO_SLOT  # the slot it runs in, once admitted
        self.state: SequenceState | None = None
        self.position = 0          # prompt positions in the cache (while prefilling)
        self.pieces: list[int] = []  # ends of the prompt pieces still to prefill
        self.pending = -1          # the token drawn last, decoded at the next step
        self.submitted = time.perf_counter()
        self.start = self.prompt_done = 0.0
        self.prompt_cached = 0
        self.prompt_tps = 0.0

    # ---- what the caller reads ----
    @property
    def done(self) -> bool:
        """True once the request has ended (finished, cancelled, or failed)."""
        return self._finished

    def cancel(self) -> None:
        """Stop the request: a waiting one leaves the queue now, a running one frees its slot at the next step.
        Its steps end with finish_reason "cancelled". Does nothing once it has ended. Thread-safe."""
        self._engine._cancel(self)

    def __iter__(self) -> Iterator[GenerationStep]:
        index = 0
        while True:
            with self._cond:
                while index >= len(self._steps) and not self._finished:
                    self._cond.wait()
                if index < len(self._steps):
                    step = self._steps[index]
                    index += 1
                elif self._error is not None:
                    raise _fresh(self._error)
                else:
                    return
            yield step

    def __aiter__(self) -> AsyncIterator[GenerationStep]:
        return self._async_steps()

    async def _async_steps(self) -> AsyncIterator[GenerationStep]:
        loop = asyncio.get_running_loop()
        index = 0
        while True:
            future = step = None
            with self._cond:
                if index < len(self._steps):
                    step = self._steps[index]
                    index += 1
                elif self._finished:
                    if self._error is not None:
                        raise _fresh(self._error)
                    return
                else:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            if future is not None:
                await future
            else:
                assert step is not None  # no future: a step was there
                yield step

    def __await__(self) -> Generator[Any, None, Generation]:
        return self._async_result().__await__()

    async def _async_result(self) -> Generation:
        async for _ in self._async_steps():
            pass
        return self.result()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the request to end and return its Generation (finish_reason "stop", "length" or
        "cancelled"). Raises the typed error that ended it, if one did; TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._finished, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
            if self._error is not None:
                raise _fresh(self._error)
            steps = list(self._steps)
        tokens = [s.token for s in steps if s.token >= 0]
        last = steps[-1]
        return Generation(text="".join(s.text for s in steps), tokens=tokens, finish_reason=last.finish_reason or "",
                          prompt_tokens=len(self.tokens), prompt_tps=self.prompt_tps,
                          generation_tps=last.generation_tps)

    # ---- what the scheduler writes ----
    def _push(self, token: int, text: str, finish: str | None) -> None:
        now = time.perf_counter()
        state = self.state
        generated = state.generated if state is not None else 0
        tps = generated / max(now - self.prompt_done, 1e-9) if generated else 0.0
        step = _new_step(token, text, finish, len(self.tokens), self.prompt_cached, generated, self.prompt_tps,
                         tps, now - self.submitted)
        with self._cond:
            self._steps.append(step)
            if finish is not None:
                self._finished = True
                self._release()
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._finished:
                return
            self._error = error
            self._finished = True
            self._release()
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        _wake(waiters)


    def _release(self) -> None:
        self._sampler.close()
        if self._grammar is not None:
            self._grammar.close()


def _fresh(error: BaseException) -> BaseException:
    """A new exception like `error` (one raised in several threads would pile up tracebacks)."""
    try:
        return type(error)(*error.args)
    except Exception:  # pragma: no cover - an exception class with another constructor
        return error


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]  # an async iteration waiting for a step


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(waiters: list[_Waiter]) -> None:
    for loop, future in waiters:
        try:
            loop.call_soon_threadsafe(_set_result, future)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def reusable_prefix(cached: Sequence[int], kinds: bytes | bytearray, tokens: list[int], exact: bool = True) -> int:
    """How many leading tokens of a prompt a cache holding `cached` (computed as `kinds` say) holds computed as a
    lone run computes them, cut by exact_reuse (exact=False: every token of the common prefix but the prompt's
    last)."""
    n_prompt = len(tokens)
    n = common_prefix_length(cached, tokens, 0, min(n_prompt - 1, len(cached)))
    if not exact:
        return n
    for row in range(n):
        if kinds[row] != lone_kind(row, n_prompt):
            n = row
            break
    return exact_reuse(n, n_prompt)


class _Slot:
    """One sequence of the context: which request runs in it, which tokens its cache holds, and which session
    (if any) that cache belongs to."""

    __slots__ = ("cached", "kinds", "last_used", "request", "seq_id", "session")

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.request: EngineRequest | None = None
        self.cached: list[int] = []   # the tokens the KV cache holds for this sequence, position by position
        self.kinds = bytearray()      # how each of them was computed (piece_kind)
        self.last_used = 0.0
        # the session whose conversation this cache holds: saved to host memory before the slot is reused
        self.session: _Session | None = None

    def reusable(self, tokens: list[int], exact: bool = True) -> int:
        """reusable_prefix of this slot's cache."""
        return reusable_prefix(self.cached, self.kinds, tokens, exact)


class _Session:
    """A conversation kept across requests (`submit(..., session=id)`): its KV state lies in a slot (`slot`;
    the slot's cached / kinds say what it holds) or, once another request needed that slot, in host memory
    (`state`, bytes of llama_state_seq_get_data, holding `cached` computed as `kinds` say)."""

    __slots__ = ("cached", "kinds", "last_used", "name", "slot", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot: _Slot | None = None
        self.state: bytes | bytearray | memoryview | None = None
        self.cached: list[int] = []
        self.kinds = b""
        self.last_used = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """One session of `Engine.sessions()`. tokens: the token ids whose KV state it keeps (its prompts and
    replies so far, less the last reply's last token, which no decode has computed yet). where: "slot N" (in
    slot N's cache, or running there) or "host" (saved to host memory). bytes: the host memory its saved
    state takes (0 in a slot)."""

    id: str
    tokens: tuple[int, ...]
    where: str
    bytes: int


@exclusive
def save_sequence(context: Context, seq_id: int, buffer: bytearray | None = None) -> memoryview:
    """The KV state of one sequence of `context` (llama_state_seq_get_data), for restore_sequence: a view of
    the bytes written into `buffer` when it is large enough, else into a new bytearray (the view's `obj`).
    Reusing the buffer of a state no longer needed matters: the first touch of fresh memory (zeroing, page
    faults) cost several times the copy itself (benchmarks/engine_sessions.py, save_s against save_reused_s)."""
    ptr = context._ptr
    size = C.llama_state_seq_get_size(ptr, seq_id)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
    written = native_call(C.llama_state_seq_get_data, ptr, ffi.from_buffer("uint8_t[]", buffer), size, seq_id,
                          error=lambda reason: LlmplaceError(f"llama.cpp could not save sequence {seq_id}'s state: "
                                                             f"{reason}"),
                          failed=lambda n: n == 0 or n > size)
    return memoryview(buffer)[:written]


@exclusive
def restore_sequence(context: Context, seq_id: int, data: bytes | bytearray | memoryview,
                     tokens: Sequence[int]) -> None:
    """Make sequence `seq_id` hold the state `data` (from save_sequence, of a context of the same model and
    slot size), which holds `tokens`. Raises InvalidParameterError, with llama.cpp's reason, when llama.cpp
    refuses the bytes; the sequence is then empty."""
    size = len(data)
    try:
        native_call(C.llama_state_seq_set_data, context._ptr, ffi.from_buffer("uint8_t[]", data), size, seq_id,
                    error=lambda reason: InvalidParameterError(f"llama.cpp refused the saved state ({size} bytes): "
                                                               f"{reason}"),
                    failed=lambda n: n != size)
    except InvalidParameterError:
        C.llama_memory_seq_rm(C.llama_get_memory(context._ptr), seq_id, -1, -1)  # a partial restore: forget it
        if seq_id == 0:
            context.tokens.clear()
        raise
    if seq_id == 0:  # Context.tokens lists what sequence 0 holds
        context.tokens = [int(t) for t in tokens]


_NO_SLOT = _Slot(-1)  # the slot of a request not admitted (yet)


class Engine:
    """Serve several generation requests at once on one model (continuous batching).

    slots: sequences decoded together (each has its own KV cache of n_ctx tokens; default n_ctx: the model's
    load(n_ctx=...), else min(4096, trained length)). n_batch: the most prompt tokens prefilled per step (in
    pieces; generating sequences get their token at every step). max_queue: requests waiting for a slot
    before submit raises BusyError. exact: keep every request's output equal to a lone `generate` (see the
    module docstring); `batched` then says whether a step decodes all sequences' tokens at once (a probe at
    start found that bit-equal) or one decode each. exact=False always batches them and reuses every cached
    prefix token, whatever kernel computed it (faster where the kernels differ, as on a GPU, and for chats
    whose next turn extends the last; output may then differ from a lone run at near-ties). max_session_bytes:
    host memory the saved KV states of idle sessions (`submit(..., session=id)`) may take together; beyond it
    the least recently used sessions are dropped (their next turn is computed again). Other keywords go to
    the Context (n_threads, flash_attn, type_k, ...). Requests are submitted from any thread (`submit`);
    close() (or the with-block's end) stops the engine: requests not finished then raise ClosedError."""

    def __init__(self, model: Model, slots: int = 4, n_ctx: int | None = None, n_batch: int = 512, *,
                 max_queue: int = DEFAULT_MAX_QUEUE, exact: bool = True,
                 max_session_bytes: int = DEFAULT_MAX_SESSION_BYTES, **context_options: Any) -> None:
        for name, value, upper in (("slots", slots, 256), ("n_batch", n_batch, 1 << 24),
                                   ("max_queue", max_queue, 1 << 30)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
                raise InvalidParameterError(f"{name} must be an int between 1 and {upper}, not {value!r}")
        if isinstance(max_session_bytes, bool) or not isinstance(max_session_bytes, int) or max_session_bytes < 0:
            raise InvalidParameterError(f"max_session_bytes must be an int >= 0 (0: no session state is kept in host "
                                        f"memory), not {max_session_bytes!r}")
        if not isinstance(exact, bool):
            raise InvalidParameterError(f"exact must be True or False, not {exact!r}")
        if n_ctx is None:
            n_ctx = model.default_n_ctx or (min(4096, model.n_ctx_train) if model.n_ctx_train > 0 else 4096)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise InvalidParameterError(f"n_ctx (tokens each slot holds) must be an int >= 1, not {n_ctx!r}")
        context_names = set(inspect.signature(Context).parameters) - {"model", "n_ctx", "n_seq_max", "n_batch"}
        unknown = set(context_options) - context_names
        if unknown & _SAMPLING_NAMES or unknown & {"max_tokens", "stop"}:
            raise InvalidParameterError(f"{', '.join(sorted(unknown))}: sampling options and max_tokens / stop are "
                                        "per request: pass them to submit()")
        if unknown - {"n_seq_max", "n_batch"}:
            raise unknown_keyword_error("Engine", unknown - {"n_seq_max", "n_batch"},
                                        context_names | {"slots", "n_ctx", "n_batch", "max_queue",
                                                         "max_session_bytes"})
        taken = {"n_seq_max", "n_batch"} & set(context_options)
        if taken:
            raise InvalidParameterError(f"{', '.join(sorted(taken))}: the Engine sets these (slots=, n_batch=)")
        extra = dict(context_options.pop("extra_params", None) or {})
        if extra.get("kv_unified"):
            raise InvalidParameterError("the Engine gives each slot a KV cache of its own (kv_unified=False): "
                                        "in a unified cache a sequence's results depend on the others' (see "
                                        "llmplace/engine.py); leave kv_unified out")
        extra["kv_unified"] = False
        context_options.setdefault("n_ubatch", PREFILL_UNIT)
        self.model = model
        self._is_eog = model.vocab.is_eog
        self.slots = slots
        self.n_batch = n_batch
        self.max_queue = max_queue
        self._context = Context(model, n_ctx=n_ctx * slots, n_batch=max(PREFILL_UNIT, slots), n_seq_max=slots,
                                extra_params=extra, **context_options)
        self.n_ctx = self._context.n_ctx_seq  # llama.cpp rounds each sequence's cache up to a multiple of 256
        self._slots = [_Slot(i) for i in range(slots)]
        self.exact = exact
        try:
            # whether the generating sequences' tokens are decoded in one batch (see the module docstring)
            experts = model.metadata.get(f"{model.arch}.expert_count", "0")
            self.batched = not exact or slots == 1 or (experts in ("", "0") and self._batch_equals_one_row())
        except BaseException:
            self._context.close()
            raise
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._active: list[EngineRequest] = []   # admitted, in admission order
        # sessions by id; what they and the slots' `session` say is changed under _wake (sessions() and
        # drop_session read and change it from the caller's thread)
        self.max_session_bytes = max_session_bytes
        self._sessions: dict[str, _Session] = {}
        self._session_bytes = 0   # host memory the saved states take together
        # the buffer of the state freed last, for the next save to write into (see save_sequence); host memory
        # beyond max_session_bytes by at most one state
        self._spare_buffer: bytearray | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llmplace-engine", daemon=True)
        self._thread.start()

    def _batch_equals_one_row(self) -> bool:
        """Give every sequence a short history of its own, decode a token in each sequence alone, then the same
        tokens as one batch of `slots` rows: True when every row of the batch has the logits of its lone
        decode, bit for bit. (Rows must differ: with equal rows a Q4_K model passed this test and still
        differed from lone runs with 8 sequences.)"""
        context, n_vocab, slots = self._context, self.model.n_vocab, self.slots
        history = 2
        tokens = [[(7 + 3 * s + i) % n_vocab for i in range(history + 1)] for s in range(slots)]
        try:
            context.decode_batch([(s, t[i], i, False) for s, t in enumerate(tokens) for i in range(history)])
            alone = []
            for s, t in enumerate(tokens):
                alone.append(context.logits(context.decode_batch([(s, t[history], history, True)])[0]))
                if context.truncate_sequence(s, history) != history:
                    return False  # a memory that cannot drop a token (recurrent): no probe, one decode each
            rows = context.decode_batch([(s, t[history], history, True) for s, t in enumerate(tokens)])
            return all(np.array_equal(context.logits(i), alone[s]) for s, i in enumerate(rows))
        finally:
            for s in range(slots):
                context.remove_sequence(s)

    # ---- the caller's side ----
    def submit(self, prompt: str | bytes | Sequence[int], *, max_tokens: int = 256, stop: str | Sequence[str] = (),
               sampling: SamplingParams | None = None, add_special: bool = True,
               grammar: str | LlamaGrammar | None = None, keep_logits: bool = False,
               logits_processor: LogitsProcessors | None = None, session: str | None = None,
               **sampling_kwargs: Any) -> EngineRequest:
        """Queue a request (text or token ids, as `generate`); it starts when a slot is free. Sampling options
        as `generate`'s (temperature, top_k, top_p, min_p, seed, penalties, logit_bias ...), per request.
        grammar: GBNF text or a LlamaGrammar (llmplace.compat.llama_grammar): only tokens it allows are drawn,
        as the drop-in Llama's create_completion(grammar=...) draws them. keep_logits: keep the logits each
        generated token was drawn from in `request.logits_rows` (what logprobs are computed from; n_vocab
        floats a token). logits_processor: a callable (input_ids, scores) -> scores, as the drop-in's, applied
        before the grammar; it runs on the engine's thread, between the steps of every request, so it should
        be quick; an exception from it ends its own request (raised from result() and iteration).
        session: an id (a str) of the conversation this request continues. The session keeps the KV state of
        its prompt and reply when the request ends: in its slot while no other request needs that slot, then
        saved to host memory (llama_state_seq_get_data) and restored into a free slot when the session's next
        request comes, instead of computing that prefix again (a chat's next turn, whose prompt extends the
        last prompt and reply). The output is the same as without a session. A session runs one request at a
        time (a second one waits for the first to end). See sessions() and drop_session().
        Raises BusyError when max_queue requests are waiting, ClosedError after close(), and the typed errors
        of bad arguments (here, not later)."""
        unknown = set(sampling_kwargs) - _SAMPLING_NAMES
        if unknown & _SPECULATIVE:
            raise InvalidParameterError("speculative decoding (draft=, lookup=) runs one sequence at a time: use "
                                        "llmplace.generate(..., draft=...) for it; the Engine does not draft")
        if unknown:
            raise unknown_keyword_error("Engine.submit", unknown,
                                        {"max_tokens", "stop", "sampling", "add_special", "grammar", "keep_logits",
                                         "logits_processor", "session"} | _SAMPLING_NAMES)
        if sampling is not None and sampling_kwargs:
            raise InvalidParameterError("pass sampling options either as sampling=SamplingParams(...) or as "
                                        "keywords, not both")
        params = sampling or SamplingParams(**sampling_kwargs)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise InvalidParameterError(f"max_tokens must be an int >= 0, not {max_tokens!r}")
        stops = stop_strings(stop)
        if logits_processor is not None and not callable(logits_processor):
            raise InvalidParameterError(f"logits_processor must be a callable (input_ids, scores) -> scores, not "
                                        f"{type(logits_processor).__name__}")
        if not isinstance(keep_logits, bool):
            raise InvalidParameterError(f"keep_logits must be True or False, not {keep_logits!r}")
        if session is not None and (not isinstance(session, str) or not session):
            raise InvalidParameterError(f"session must be a non-empty str (the conversation's id) or None, not "
                                        f"{session!r}")
        if self._closing:
            raise ClosedError("this Engine is closed; create a new one")
        tokens = _prompt_tokens(self.model, prompt, add_special)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but a slot holds {self.n_ctx} (and generation needs at least "
                "one more); shorten the prompt, or create the Engine with a larger n_ctx")
        constraint = GrammarConstraint(self.model, grammar) if grammar is not None else None
        sampler = Sampler(self.model.n_vocab, params, n_ctx=self.n_ctx)
        if params.uses_penalties:
            for token in tokens:
                sampler.accept(token)
        request = EngineRequest(self, tokens, max_tokens, stops, params, sampler, constraint)
        if keep_logits:
            request.logits_rows = []
        request._processor = logits_processor
        request.session = session
        with self._wake:
            if self._closing:
                request._release()
                raise ClosedError("this Engine is closed; create a new one")
            if len(self._waiting) >= self.max_queue:
                request._release()
                raise BusyError(f"the Engine's wait queue is full ({self.max_queue} requests wait for a slot): "
                                "retry later, or create the Engine with a larger max_queue or more slots")
            self._waiting.append(request)
            self._wake.notify_all()
        return request

    def generate(self, prompt: str | bytes | Sequence[int], **kwargs: Any) -> Generation:
        """submit(prompt, **kwargs).result(): one request, waited for."""
        return self.submit(prompt, **kwargs).result()

    def _cancel(self, request: EngineRequest) -> None:
        with self._wake:
            if request.done:
                return
            request._cancelled = True
            try:
                self._waiting.remove(request)
            except ValueError:  # running: the scheduler ends it at its next step
                self._wake.notify_all()
                return
        request._push(-1, "", "cancelled")

    @property
    def closed(self) -> bool:
        return self._closing

    def occupancy(self) -> tuple[int, int]:
        """(slots running a request, requests waiting for a slot), read together."""
        with self._wake:
            return sum(slot.request is not None for slot in self._slots), len(self._waiting)

    def sessions(self) -> list[SessionInfo]:
        """The sessions this Engine keeps (submit(..., session=id)), least recently used first: where each
        one's KV state lies ("slot N" or "host"), its tokens and the host bytes it takes."""
        with self._wake:
            records = sorted(self._sessions.values(), key=lambda r: r.last_used)
            return [SessionInfo(r.name, tuple(r.slot.cached), f"slot {r.slot.seq_id}", 0) if r.slot is not None
                    else SessionInfo(r.name, tuple(r.cached), "host", len(r.state or b"")) for r in records]

    def drop_session(self, session: str) -> None:
        """Forget a session: its saved state's host memory is freed (a slot holding it keeps the tokens as a
        plain cached prefix); its next request starts a new session computed from its prompt. A request of it
        that is running finishes as it would. Raises InvalidParameterError for an id this Engine does not
        keep (never submitted, already dropped, or dropped for max_session_bytes)."""
        if not isinstance(session, str):
            raise InvalidParameterError(f"a session id is a str, not {type(session).__name__} ({session!r})")
        with self._wake:
            record = self._sessions.pop(session, None)
            if record is None:
                raise InvalidParameterError(f"this Engine keeps no session {session!r} (never submitted, already "
                                            "dropped, or dropped as the least recently used beyond "
                                            f"max_session_bytes={self.max_session_bytes}); sessions() lists those "
                                            "it keeps")
            self._forget_session(record)

    def _forget_session(self, record: _Session) -> None:
        """Detach a session taken out of _sessions from its slot and its host memory (under _wake)."""
        if record.slot is not None and record.slot.session is record:
            record.slot.session = None
        record.slot = None
        if record.state is not None:
            self._free_state(record)

    def _free_state(self, record: _Session, *, spare: bool = False) -> None:
        """Take a session's saved state out of host memory (under _wake). spare: its buffer becomes the one the
        next save writes into; only where nothing may still read it (after its restore, on the scheduler
        thread: a state dropped meanwhile may be the one _admit is about to restore)."""
        state = record.state
        if state is None:
            return
        self._session_bytes -= len(state)
        record.state, record.cached, record.kinds = None, [], b""
        buffer = state.obj if isinstance(state, memoryview) else None
        if spare and isinstance(buffer, bytearray) and (self._spare_buffer is None
                                                        or len(buffer) > len(self._spare_buffer)):
            self._spare_buffer = buffer

    def close(self) -> None:
        """Stop the scheduler (a decode in flight is aborted), end every unfinished request with ClosedError,
        free the context. Safe to call more than once, from any thread."""
        with self._wake:
            already = self._closing
            self._closing = True
            self._wake.notify_all()
        if not already:
            try:
                self._context.abort()
            except LlmplaceError:
                pass
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._context.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the scheduler thread ----
    def _run(self) -> None:
        error: BaseException = ClosedError(CLOSED_WHILE_RUNNING)
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._closing:
                        break
                    admitted: list[EngineRequest] = []
                    free = sum(slot.request is None for slot in self._slots)
                    # a session runs one request at a time: its next one waits while one runs
                    busy = {r.session for r in self._active if r.session is not None}
                    for request in list(self._waiting):
                        if len(admitted) >= free:
                            break
                        if request.session is None or request.session not in busy:
                            self._waiting.remove(request)
                            admitted.append(request)
                            if request.session is not None:
                                busy.add(request.session)
                for request in admitted:
                    self._admit(request)
                self._step()
        except BaseException as exc:  # the context was closed under it (Model.close), or worse: end everything
            if not self._closing:
                if isinstance(exc, LlmplaceError) and not self._context._lifetime.closing:
                    error = exc
                else:
                    error = ClosedError(f"{CLOSED_WHILE_RUNNING} ({type(exc).__name__}: {exc})")
        finally:
            with self._wake:
                self._closing = True
                leftovers = list(self._waiting) + list(self._active)
                self._waiting.clear()
                self._active.clear()
            for request in leftovers:
                request._fail(error)

    def _admit(self, request: EngineRequest) -> None:
        """Put a request in a free slot, reusing the longest prefix of its prompt found in any slot's cache:
        the free slot's own (kept), or another slot's (copied)."""
        if request._cancelled:
            request._push(-1, "", "cancelled")
            return
        tokens = request.tokens
        if request.max_tokens == 0:
            request.state = SequenceState(TextAssembler(self.model.vocab, request.stops), len(tokens), 0, self.n_ctx)
            request._push(-1, "", "length")
            return
        context = self._context
        with self._wake:
            record = None
            if request.session is not None:
                record = self._sessions.get(request.session)
                if record is None:
                    record = self._sessions[request.session] = _Session(request.session)
                record.last_used = time.perf_counter()  # speaking now: not the least recently used to drop
            free = [slot for slot in self._slots if slot.request is None]
            if record is not None and record.slot is not None and record.slot.request is None:
                candidates = [record.slot]  # the session's own cache, kept in its slot
            else:
                # the free slots no session holds; else the one whose session spoke least recently (its state
                # is saved to host memory first)
                candidates = [s for s in free if s.session is None] or [
                    min(free, key=lambda s: s.session.last_used if s.session is not None else 0.0)]
            saved, saved_tokens, saved_kinds = None, [], b""
            if record is not None and record.state is not None:
                saved, saved_tokens, saved_kinds = record.state, record.cached, record.kinds
        reusable = {slot.seq_id: slot.reusable(tokens, self.exact) if slot.cached else 0 for slot in self._slots}
        restorable = reusable_prefix(saved_tokens, saved_kinds, tokens, self.exact) if saved_tokens else 0
        reused = -1
        if saved is not None and restorable > max(reusable.values()):
            # the session's saved state holds more of the prompt than any slot: restore it, not recompute
            target = min(candidates, key=lambda s: (len(s.cached), s.last_used))
            self._evict(target, keep=record)
            try:
                restore_sequence(context, target.seq_id, saved, saved_tokens)
            except InvalidParameterError as exc:
                warnings.warn(f"session {request.session!r}: its saved KV state ({len(saved)} bytes, "
                              f"{len(saved_tokens)} tokens) could not be restored ({exc}); its prompt is computed "
                              "again", RuntimeWarning, stacklevel=1)
                target.cached, target.kinds, reusable[target.seq_id] = [], bytearray(), 0
            else:
                reused = context.truncate_sequence(target.seq_id, restorable)
                kinds = bytearray(saved_kinds[:reused])
        if reused < 0:
            # the free slot whose cache shares most with the prompt; among equals, the one holding least
            own = max(candidates, key=lambda s: (reusable[s.seq_id], -len(s.cached), -s.last_used))
            source = max(self._slots, key=lambda s: reusable[s.seq_id])
            if reusable[source.seq_id] > reusable[own.seq_id]:
                # a copy of another slot's prefix replaces what the chosen slot held: take the one holding least
                target = min(candidates, key=lambda s: (len(s.cached), s.last_used))
                self._evict(target, keep=record)
                reused = context.copy_sequence(source.seq_id, target.seq_id, reusable[source.seq_id], tokens=tokens)
                kinds = source.kinds[:reused]
            else:
                target = own
                self._evict(target, keep=record)
                reused = context.truncate_sequence(target.seq_id, reusable[own.seq_id])
                kinds = target.kinds[:reused]
        if record is not None:
            with self._wake:
                if record.state is not None:  # restored, or no longer what the session holds: free it
                    self._free_state(record, spare=True)
                if self._sessions.get(record.name) is record:  # (not dropped meanwhile)
                    record.slot, target.session = target, record
                    record.last_used = time.perf_counter()
        target.cached = list(tokens[:reused])
        target.kinds = kinds
        target.request = request
        target.last_used = time.perf_counter()
        request.slot = target
        request.position = request.prompt_cached = reused
        request.pieces = prefill_pieces(reused, len(tokens), self.n_batch)
        request.start = time.perf_counter()
        request.state = SequenceState(TextAssembler(self.model.vocab, request.stops), len(tokens),
                                      request.max_tokens, self.n_ctx)
        self._active.append(request)

    def _evict(self, slot: _Slot, keep: _Session | None) -> None:
        """Before `slot`'s cache is given to another request: save the KV state of the session it holds (unless
        that is `keep`, the request's own) to host memory, then drop the least recently used saved states
        beyond max_session_bytes. A session whose state cannot be kept is dropped (its next turn is computed)."""
        with self._wake:
            record = slot.session
            if record is None or record is keep:
                return
            slot.session = None
        data = None
        if self.max_session_bytes > 0 and slot.cached:
            with self._wake:
                buffer, self._spare_buffer = self._spare_buffer, None
            try:
                data = save_sequence(self._context, slot.seq_id, buffer)
            except LlmplaceError as exc:
                if self._closing or self._context._lifetime.closing:
                    raise
                warnings.warn(f"session {record.name!r}: its KV state could not be saved ({exc}); its next request "
                              "computes its prompt again", RuntimeWarning, stacklevel=1)
        with self._wake:
            if self._sessions.get(record.name) is not record:  # dropped meanwhile
                return
            record.slot = None
            if data is None or len(data) > self.max_session_bytes:
                del self._sessions[record.name]
                return
            record.state, record.cached, record.kinds = data, list(slot.cached), bytes(slot.kinds)
            self._session_bytes += len(data)
            while self._session_bytes > self.max_session_bytes:
                oldest = min((r for r in self._sessions.values() if r.state is not None), key=lambda r: r.last_used)
                del self._sessions[oldest.name]
                self._forget_session(oldest)

    def _step(self) -> None:
        """One step: end cancelled requests, decode each generating sequence's last token, prefill prompt
        pieces; draw a token for every sequence that got logits."""
        for request in [r for r in self._active if r._cancelled]:
            self._finish(request, cancelled=True)
        generating = [r for r in self._active if r.pending >= 0]
        if not self.batched:
            calls = [[r] for r in generating]
        elif not self.exact:
            calls = [sorted(generating, key=lambda r: r.slot.seq_id)] if generating else []
        else:
            together = sorted((r for r in generating if len(r.slot.cached) < KV_PAD), key=lambda r: r.slot.seq_id)
            calls = [together] if together else []
            calls += [[r] for r in generating if len(r.slot.cached) >= KV_PAD]
        for group in calls:
            self._decode(group, [(r.slot.seq_id, r.pending, len(r.slot.cached), True) for r in group],
                         [r.pending for r in group])
        budget = self.n_batch
        for request in [r for r in self._active if r.pieces]:
            while request.pieces and budget > 0 and not request.done:
                end = request.pieces[0]
                start, seq_id, last = request.position, request.slot.seq_id, len(request.tokens)
                piece = request.tokens[start:end]
                entries = [(seq_id, token, start + i, start + i == last - 1) for i, token in enumerate(piece)]
                if not self._decode([request], entries, [piece]):
                    break
                budget -= len(piece)
            if budget <= 0:
                break

    def _decode(self, group: list[EngineRequest], entries: list[tuple[int, int, int, bool]],
                added: list[int | list[int]]) -> bool:
        """One decode_batch for `group` (one entry list), then the draws. `added`: per request, what its cache
        gains (a token, or a list of prompt tokens). False when the decode failed (those requests end)."""
        try:
            outputs = self._context.decode_batch(entries)
        except LlmplaceError as exc:
            if self._closing or self._context._lifetime.closing:  # close(), or Model.close() closed the context
                raise
            for request in group:
                self._end(request)
                request._fail(exc)
            return False
        seq_index = {request.slot.seq_id: request for request in group}
        for request, gained in zip(group, added):
            slot = request.slot
            if isinstance(gained, list):
                slot.kinds.extend([piece_kind(len(slot.cached), len(gained))] * len(gained))
                slot.cached.extend(gained)
                request.position += len(gained)
                request.pieces.pop(0)
                if not request.pieces:
                    request.prompt_done = now = time.perf_counter()
                    computed = len(request.tokens) - request.prompt_cached
                    request.prompt_tps = computed / max(now - request.start, 1e-9)
            else:
                slot.kinds.append(piece_kind(len(slot.cached), 1))
                slot.cached.append(gained)
        context = self._context
        for index in outputs:
            request = seq_index[entries[index][0]]
            grammar, rows, processor = request._grammar, request.logits_rows, request._processor
            if rows is not None:
                rows.append(context.logits(index))
            if grammar is not None or processor is not None:
                # as token_loop.DrawnTokens draws with hooks: processors, then the grammar's mask, then the chain
                logits = context.logits(index)
                try:
                    if processor is not None:
                        logits = processed_logits(processor, np.asarray(request.slot.cached, dtype=np.intc), logits)
                    if grammar is not None:
                        grammar.apply(logits)
                # the caller's code or grammar ends its own request, not the engine: a KeyboardInterrupt or SystemExit
                # raised by a processor too (it ended every request and closed the engine)
                except BaseException as exc:
                    self._end(request)
                    request._fail(exc)
                    continue
                context.set_logits(logits, index)
            token = request._sampler.sample(context, index)
            if grammar is not None and not self._is_eog(token):
                try:
                    grammar.accept(token)
                except InvalidParameterError as exc:
                    self._end(request)
                    request._fail(exc)
                    continue
            state = request.state
            assert state is not None  # set at admission
            text, finish = state.emit(token)
            if finish is None:
                request.pending = token
                request._push(token, text, None)
            else:
                request.pending = -1
                self._end(request)
                request._push(token, text, finish)
        return True

    def _finish(self, request: EngineRequest, *, cancelled: bool) -> None:
        self._end(request)
        if cancelled:
            text = request.state.assembler.end() if request.state is not None else ""
            request._push(-1, text, "cancelled")

    def _end(self, request: EngineRequest) -> None:
        """Free the request's slot; its cache stays, for a later prompt with the same prefix."""
        slot = request.slot
        if slot.request is request:
            slot.request = None
            slot.last_used = time.perf_counter()
            if slot.session is not None:
                with self._wake:
                    if slot.session is not None:
                        slot.session.last_used = slot.last_used  # least recently used: by when it last spoke
        request.pending = -1
        request.pieces = []
        if request in self._active:
            self._active.remove(request)


def generate_batch(model: Model, prompts: Sequence[str | bytes | Sequence[int]], *, slots: int | None = None,
                   n_ctx: int | None = None, max_tokens: int = 256, add_special: bool = True,
                   **kwargs: Any) -> list[Generation]:
    """Generate a reply to each prompt, batched on one Engine, and return the Generations in prompt order.
    Each equals `generate(model, prompt, ...)` with the same keywords (greedy output token for token on the
    CPU; a seed gives each request the same draws as alone). slots: sequences at once (default: the number
    of prompts, at most 8). n_ctx: tokens per slot (default: enough for the longest prompt and max_tokens, as
    `generate` sizes its context). Other keywords: sampling options and stop, as `generate`'s, and Context
    options (n_threads, flash_attn ...)."""
    prompts = list(prompts)
    if not prompts:
        return []
    token_lists = [_prompt_tokens(model, prompt, add_special) for prompt in prompts]
    if slots is None:
        slots = min(len(prompts), 8)
    if n_ctx is None:
        longest = max(len(tokens) for tokens in token_lists)
        n_ctx = model.default_n_ctx or min(max(512, longest + max_tokens + 1),
                                           max(model.n_ctx_train, longest + 1))
    submit_names = {"stop", "sampling"} | _SAMPLING_NAMES | _SPECULATIVE
    request_options = {k: v for k, v in kwargs.items() if k in submit_names}
    context_options = {k: v for k, v in kwargs.items() if k not in submit_names}
    with Engine(model, slots=slots, n_ctx=n_ctx, max_queue=len(prompts), **context_options) as engine:
        handles = [engine.submit(tokens, max_tokens=max_tokens, **request_options) for tokens in token_lists]
        return [handle.result() for handle in handles]
