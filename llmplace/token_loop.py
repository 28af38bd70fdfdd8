"""The token loop: the one place where a sequence's tokens are drawn, counted against its limits, turned into
text and fed back to the model. Plain generation, speculative decoding, `Chat`, and the drop-in's completions
(with logits processors, grammars, stopping criteria, logprobs) all run it.

Three parts, so that the engine that decodes many sequences in one batch reuses the first two:
- `SequenceState`: what one sequence is in the middle of (its limits, the tokens it generated, its text
  assembler). Nothing in it refers to the others or to a batch: an engine keeps one per sequence and calls
  `emit` for each token it draws for it.
- a token source: where tokens come from. `DrawnTokens` draws one per step with the sequence's sampler from the
  context's last logits (after the `LogitsHooks`, when the call has any) and decodes it into the context;
  speculative decoding's source (`llmplace.speculative.SpeculativeTokens`) yields the tokens of a verified draft.
  A source has `draw()` (the next tokens, or None when a stopping criterion ends the sequence before a token),
  `advance(token, finished)` (called before each token is handed out) and `close()`.
- `run`: the single-sequence loop over a source, yielding (token, text, finish_reason) tuples: no per-token
  object, so that `generate` and the drop-in pay nothing they do not read.

The context must hold the prompt before the loop starts (`Context.reuse_prefix`, then `decode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

from .errors import InvalidParameterError
from .text_assembly import TextAssembler

if TYPE_CHECKING:
    from .context import Context
    from .sampling import Sampler


class SequenceState:
    """One sequence's progress: `emit(token)` counts the token, checks the limits (max_tokens, and the context:
    a token that cannot be decoded after it ends the sequence) and returns (text it adds, finish reason)."""

    __slots__ = ("n_prompt", "max_tokens", "n_ctx", "generated", "assembler", "_add")

    def __init__(self, assembler: TextAssembler, n_prompt: int, max_tokens: int, n_ctx: int) -> None:
        self.assembler, self.n_prompt, self.max_tokens, self.n_ctx = assembler, n_prompt, max_tokens, n_ctx
        self.generated = 0
        self._add = assembler.add

    def emit(self, token: int) -> tuple[str, str | None]:
        self.generated = generated = self.generated + 1
        # The context holds the prompt and the generated tokens before this one: n_prompt + generated - 1.
        return self._add(token, generated >= self.max_tokens or self.n_prompt + generated - 1 >= self.n_ctx)

    @property
    def room(self) -> int:
        """Tokens this sequence may still generate after the next one (what a drafter may propose)."""
        return min(self.n_ctx - (self.n_prompt + self.generated) - 1, self.max_tokens - self.generated - 1)


class TokenSource(Protocol):
    def draw(self) -> tuple[int, ...] | list[int] | None: ...
    def advance(self, token: int, finished: bool) -> None: ...
    def close(self) -> None: ...


if TYPE_CHECKING:  # annotations only (numpy.typing is not imported at run time)
    import numpy.typing as npt

    # processors(input_ids, logits) -> logits; criteria(input_ids, raw_logits) -> bool
    LogitsProcessors = Callable[[np.ndarray, np.ndarray], npt.ArrayLike]
    StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class Grammar(Protocol):
    def apply(self, logits: np.ndarray) -> None: ...
    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


class LogitsHooks:
    """What a call does to each token's logits around the draw (the drop-in's logits_processor, grammar,
    stopping_criteria and logprobs):
    - processors(input_ids, logits) -> logits, applied before the draw (may edit in place);
    - grammar: an object with apply(logits), accept(token) and close() (compat.llama_grammar.GrammarConstraint);
    - criteria(input_ids, raw_logits) -> bool: true ends the sequence before the token drawn (llama-cpp-python's
      stopping criteria: the token that met them is dropped);
    - keep_rows: keep the raw logits each generated token was drawn from in `rows` (logprobs)."""

    def __init__(self, processors: LogitsProcessors | None = None, grammar: Grammar | None = None,
                 criteria: StoppingCriteria | None = None, keep_rows: bool = False) -> None:
        self.processors, self.grammar, self.criteria, self.keep_rows = processors, grammar, criteria, keep_rows
        self.rows: list[np.ndarray] = []

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()


def processed_logits(processors: LogitsProcessors, input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The logits processors' result as float32[n_vocab] (they may edit `logits` in place and return it)."""
    result = processors(input_ids, logits)
    try:
        return np.array(np.broadcast_to(np.asarray(result, dtype=np.float32), logits.shape))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"a logits processor must return {logits.shape[0]} scores (one per token), "
                                    f"not {type(result).__name__} of shape {np.shape(result)}: {exc}") from None


class DrawnTokens:
    """A token source: one token per step, drawn by `sampler` from the context's last logits (after `hooks`),
    decoded into the context before it is handed out (unless it ends the sequence).

    Runs inside a use of the context (a GenerationHold's step), so it decodes through the unlocked one-token
    path. Without hooks a step is one sampler call and one decode."""

    __slots__ = ("context", "sampler", "hooks", "_sample", "_decode_one", "_is_eog")

    def __init__(self, context: Context, sampler: Sampler, hooks: LogitsHooks | None = None) -> None:
        self.context, self.sampler, self.hooks = context, sampler, hooks
        self._sample = sampler.sample
        self._decode_one = context._decode_one
        self._is_eog = context.model.vocab.is_eog

    def draw(self) -> tuple[int] | None:
        hooks = self.hooks
        if hooks is None:
            return (self._sample(self.context),)
        return self._draw_hooked(hooks)

    def _draw_hooked(self, hooks: LogitsHooks) -> tuple[int] | None:
        ctx = self.context
        # A copy (as llama-cpp-python's scores): a processor may keep what it is given. What the processors
        # and the grammar make of it is written back for the sampler to draw from.
        logits = ctx.logits()
        raw = logits.copy() if hooks.keep_rows or hooks.criteria is not None else logits
        if hooks.keep_rows:
            hooks.rows.append(raw)
        if hooks.processors is not None or hooks.grammar is not None:
            if hooks.processors is not None:
                logits = processed_logits(hooks.processors, np.asarray(ctx.tokens, dtype=np.intc), logits)
            if hooks.grammar is not None:
                hooks.grammar.apply(logits)
            ctx.set_logits(logits)
        token = self._sample(ctx)
        if hooks.grammar is not None and not self._is_eog(token):
            hooks.grammar.accept(token)
        if hooks.criteria is not None and hooks.criteria(np.asarray(ctx.tokens, dtype=np.intc), raw):
            if hooks.keep_rows:
                hooks.rows.pop()
            return None
        return (token,)

    def advance(self, token: int, finished: bool) -> None:
        if not finished:
            self._decode_one(token)

    def close(self) -> None:
        pass


def run(state: SequenceState, source: TokenSource) -> Iterator[tuple[int, str, str | None]]:
    """The single-sequence loop: (token, text it adds, finish reason) per token until one ends the sequence.
    max_tokens=0 yields one (-1, "", "length"); a stopping criterion yields (-1, held text, "stop")."""
    try:
        if state.max_tokens <= 0:
            yield -1, "", "length"
            return
        draw, advance, emit = source.draw, source.advance, state.emit
        while True:
            drawn = draw()
            if drawn is None:
                yield -1, state.assembler.end(), "stop"
                return
            for token in drawn:
                text, finish = emit(token)
                advance(token, finish is not None)
                yield token, text, finish
                if finish is not None:
                    return
    finally:
        source.close()
