"""How many tokens to draft next: the adaptive depth controller."""

from __future__ import annotations

import math


class DepthController:
    """Picks how many tokens to draft next, from measurements only, with a bounded cost of finding out.

    Model of a round. With per-token acceptance rate a, drafting k tokens yields E(k) = (1 - a^(k+1)) / (1 - a)
    tokens on average, for one target batch of k + 1 tokens, k drafter steps and the catch-up of tokens the
    drafter missed. Every cost is learned from this call's timings:
    - the target's batch cost curve t(n): the least of the recent samples of each size (other processes
      only ever slow a decode down; the least is the cost itself, comparable between sizes measured at
      different times of a drifting load), made non-decreasing, interpolated between measured sizes,
      extrapolated past the largest with the slope fitted over the measured sizes >= 2 (size 1 is often
      special). The shape is not assumed (flat on a GPU, nearly linear on a CPU: both are learned); until two
      sizes >= 2 are measured the slope is guessed optimistic (PRIOR_SLOPE). Depth grows at most to twice the
      largest size measured, but prompt lookup (free to propose) on a backend with warm-ups goes straight to
      what the guess favours;
    - a drafter step and a catch-up token (batched), measured; before that, t(1) (and the prompt's cost per
      token) times the draft's weight in bytes over the target's (lookup: free);
    - warm-ups: on a GPU the first two batches of a new size in a context run without, then capture, a CUDA
      graph (H100, SmolLM2-135M: 5-22 ms, then 6-11 ms, against 1.6 ms after). The context's first one-token
      decodes show whether its backend does this (`memory`, kept with the context); if so, those two rounds
      of a size are set aside from the curve, and a size not yet warm in the context carries the last
      warm-up's cost, spread over an episode, when a depth is chosen.

    Episodes. What a single round costs is not all that drafting costs: a GPU replays a captured graph only
    for the batch shape it ran the round before, and the rounds right after a drafting round pay for the
    change back (0.5-0.9 ms a change with one_cuda_graph_per_batch_shape, tools/vendor_llama_cpp.py; without
    it, 5.5 ms for a batch and back).
    So drafting runs in episodes of EPISODE drafting rounds at one depth (the last episode's, unless another
    promises STICKY times its rate), and two meters measure throughput (tokens / seconds, decayed): the
    draft regime (drafting rounds and the TAIL rounds after each) and plain decoding. An episode starts when
    the measured draft regime beats plain decoding by MARGIN, or, before any was measured, when the model of
    a round says so; at its end it goes on if the draft regime measured at least as fast as plain decoding.
    It stops early when the model, with the episode's size measured twice, says drafting loses.

    Bounded cost. `debt` adds up what the draft regime cost beyond plain decoding of the tokens it emitted
    (round seconds - tokens x t(1), plus catch-ups; negative when drafting pays). When drafting does not pay,
    a draft model is left out of step (no catch-up) and a probe episode starts every `backoff` plain rounds
    (doubled after an episode that did not pay), only if its worst round (everything rejected) keeps the debt
    within BUDGET of the seconds elapsed, the prompt included; an episode stops while the debt is over budget.
    When drafting pays but the draft model is out of step, catch_up_now() brings it back in batches the
    budget affords. A little SLACK (target steps) keeps the start of a call, when BUDGET of little is
    nothing, from stopping on one unlucky round; the first size's warm-up is not charged (an investment made
    once per context), later ones are. So a bad or costly drafter costs about BUDGET of the time of plain
    decoding, plus one warm-up. The first BASELINE rounds are plain: they measure t(1), the baseline.
    """

    DECAY = 0.9          # weight of the acceptance history per round
    PRIOR_SLOPE = 0.08   # guessed extra cost per batch token (x t(1)) until two sizes >= 2 are measured
    BUDGET = 0.04        # the most that speculation may lose, as a fraction of the seconds elapsed
    SLACK = 2.0          # ... plus this many target steps
    MARGIN = 1.03        # drafting must beat plain decoding by this factor (measurement noise)
    WINDOW = 16          # recent samples kept per cost
    WARMUP = 2.5         # a first batch of a size this many times over the prediction is a warm-up (see update)
    BASELINE = 3         # plain rounds first (a GPU's first one-token decodes run without, then capture a graph)
    EPISODE = 16         # drafting rounds an episode runs before its measured rate is judged
    TAIL = 2             # plain rounds after a drafting round that are charged to drafting (see the class)
    METER_DECAY = 0.9    # weight of the measured rates' history per round
    STICKY = 1.03        # another depth must promise this many times the rate of the last episode's

    def __init__(self, max_depth: int, adaptive: bool, draft_cost_free: bool, *, draft_size_ratio: float = 1.0,
                 memory: dict | None = None, prompt_seconds: float = 0.0,
                 prompt_seconds_per_token: float | None = None) -> None:
        self.max = max_depth
        self.adaptive = adaptive
        self.cost_free = draft_cost_free
        self.ratio = draft_size_ratio                  # prior: draft step cost / target step cost
        self.prompt_per_token = prompt_seconds_per_token
        self.acc, self.rej = 1.4, 0.6                  # prior: acceptance rate 0.7, weight 2
        self.samples: dict[int, list[float]] = {}      # batch size -> recent seconds
        # batch size -> (seconds, seconds predicted, seconds charged) of its warm-up rounds, set aside from the
        # curve (see update)
        self.warmed_up: dict[int, list[tuple[float, float, float]]] = {}
        self.step_samples: list[float] = []            # seconds per drafter step
        self.catchup_samples: list[float] = []         # seconds per token of a batched catch-up
        self._curve: dict[int, float] | None = None
        self._slope: float | None = None
        # Kept with the context across calls: {"runs": batch size -> times run in it, "warms_up": whether
        # its backend runs a new batch shape slowly at first (see update)}.
        self.memory = memory if memory is not None else {}
        self.memory.setdefault("runs", {})
        self.elapsed = prompt_seconds                  # seconds of this call so far
        self.debt = 0.0                                # seconds speculation lost against plain decoding
        self.plain_rounds = 0                          # plain rounds since the last draft or probe
        self.backoff = 4                               # plain rounds between probes
        self.depth: int | None = None                  # tokens drafted per round in the current episode
        self.last_depth: int | None = None             # ... in the last episode
        self.episode = 0                               # drafting rounds left in the current episode (0: none)
        self.since_draft: int | None = None            # rounds since the last drafting round
        # Measured throughput of each regime: decayed [seconds, tokens, rounds].
        self.meters = {"draft": [0.0, 0.0, 0.0], "plain": [0.0, 0.0, 0.0]}

    @staticmethod
    def _add(samples: list[float], value: float, window: int) -> None:
        samples.append(value)
        if len(samples) > window:
            del samples[0]

    # ---- the learned costs ----

    def _fit(self) -> dict[int, float]:
        est = {n: min(s) for n, s in self.samples.items()}
        running = math.inf
        for n in sorted(est, reverse=True):   # non-decreasing in n
            running = min(running, est[n])
            est[n] = running
        big = sorted(n for n in est if n >= 2)
        slope = None
        if len(big) >= 2:   # least-squares slope over the sizes >= 2
            mx = sum(big) / len(big)
            my = sum(est[n] for n in big) / len(big)
            slope = max(sum((n - mx) * (est[n] - my) for n in big) / sum((n - mx) ** 2 for n in big), 0.0)
        self._curve, self._slope = est, slope
        return est

    def verify_cost(self, size: int) -> float:
        """Seconds for a target batch of `size` tokens, from the measurements (see the class)."""
        est = self._curve if self._curve is not None else self._fit()
        if size in est:
            return est[size]
        if not est:
            return 1.0
        sizes = sorted(est)
        below = [n for n in sizes if n < size]
        above = [n for n in sizes if n > size]
        if below and above:
            lo, hi = below[-1], above[0]
            return est[lo] + (est[hi] - est[lo]) * (size - lo) / (hi - lo)
        if above:                       # below every measured size: never more than the smallest
            return est[above[0]]
        top = below[-1]
        t1 = est.get(1, est[sizes[0]])
        slope = self._slope if self._slope is not None else self.PRIOR_SLOPE * t1
        return est[top] + slope * (size - top)

    def step_cost(self) -> float:
        """Seconds per drafter step (one draft decode and pick)."""
        if self.cost_free:
            return 0.0
        if self.step_samples:
            return min(self.step_samples)
        return self.ratio * self.verify_cost(1)

    def catchup_cost(self, pending: int) -> float:
        """Seconds for the drafter to decode the `pending` - 1 tokens it missed before its first step."""
        if self.cost_free or pending <= 1:
            return 0.0
        if self.catchup_samples:
            per = min(self.catchup_samples)
        elif self.prompt_per_token is not None:
            per = self.ratio * self.prompt_per_token
        else:
            per = self.step_cost()
        return per * (pending - 1)

    @property
    def acceptance(self) -> float:
        return min(self.acc / (self.acc + self.rej), 0.999)

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def _depth_rate(self, k: int, pending: int = 0, extra: float = 0.0) -> float:
        """Expected tokens per second drafting k tokens, this round's catch-up (and `extra` seconds)
        included."""
        setup = self.catchup_cost(pending) + extra
        return self.expected_tokens(k) / (setup + k * self.step_cost() + self.verify_cost(k + 1))

    def best_depth(self, limit: int, pending: int = 0) -> tuple[int, float]:
        """(k >= 1, tokens per second) of the best depth to draft under the model, this round's catch-up
        included. The depth of the last episode is kept unless another is STICKY times better: changing it
        costs a GPU a graph rebuild and capture (see _start_episode), which the model does not see."""
        rates = {}
        # A size not run in this context yet first costs its warm-up (as much over the curve as the last
        # size's warm-up was), spread over an episode.
        warmups = list(self.warmed_up.values())
        warmup = sum(s - p for s, p, _ in warmups[-1]) / self.EPISODE if warmups and self._warms_up() else 0.0
        # At most twice the largest batch measured: the curve is explored in doublings, so a guess about sizes
        # never measured costs at most one step of the curve. But prompt lookup, free to propose, on a
        # backend that warms up each new batch shape (a GPU) goes straight to what the guessed curve favours:
        # there every size explored costs a warm-up.
        grow = self.max if self.cost_free and self._warms_up() else 2 * max(self.samples, default=1) - 1
        for k in range(1, min(self.max, limit, grow) + 1):
            rates[k] = self._depth_rate(k, pending, 0.0 if self._warm(k + 1) else warmup)
        best_k = max(rates, key=rates.__getitem__)
        kept = self.last_depth
        if kept in rates and rates[kept] * self.STICKY >= rates[best_k]:
            best_k = kept
        return best_k, rates[best_k]

    # ---- decisions ----

    def _allowance(self, slack: float = 0.0) -> float:
        """Seconds speculation may still lose now: BUDGET of the time elapsed (plus `slack` seconds)."""
        return self.BUDGET * self.elapsed + slack - self.debt

    def _warms_up(self) -> bool:
        """Whether this context's backend runs a new batch shape slowly at first (CUDA: without a graph, then
        capturing one), as the first one-token decodes of the context showed (see update)."""
        return self.memory.get("warms_up", False)

    def _warm(self, size: int) -> bool:
        """Whether batches of `size` have run in this context past their warm-up (two runs)."""
        return self.memory["runs"].get(size, 0) >= 2

    def _rate(self, regime: str) -> float | None:
        """Measured tokens per second of a regime, or None while it has too few rounds to tell."""
        seconds, tokens, rounds = self.meters[regime]
        if rounds >= self.EPISODE / 2 and seconds > 0:
            return tokens / seconds
        return 1.0 / self.verify_cost(1) if regime == "plain" else None  # plain: its least cost measured so far

    def _drafting_pays(self, limit: int, margin: float) -> bool:
        """Whether drafting beats plain decoding by `margin`: measured, once a draft episode has been timed
        (its rounds and the rounds after it: what the model of single rounds cannot see); until then, as
        the model of single rounds predicts."""
        drafted = self._rate("draft")
        if drafted is not None:
            plain = self._rate("plain")
            assert plain is not None  # plain falls back to its least cost measured
            return drafted > margin * plain
        _, rate = self.best_depth(max(limit, 1), 2)
        return rate * self.verify_cost(1) > margin

    def choose(self, limit: int, pending: int = 0) -> int:
        """Tokens to draft next (at most `limit`); `pending`: tokens the drafter must decode before drafting
        (1 or 2 when it is in step with the sequence)."""
        if limit <= 0:
            return 0
        if not self.adaptive:
            return min(self.max, limit)
        if len(self.samples.get(1, ())) < self.BASELINE:   # the baseline first
            return 0
        t1 = self.verify_cost(1)
        k, _ = self.best_depth(limit, min(pending, 2))
        # SLACK: early in a call BUDGET of little is nothing; one unlucky round must not stop drafting that
        # the measured costs favour.
        affordable = pending <= 2 and self._allowance(self.SLACK * t1) >= 0
        if self.episode:
            # Draft through the episode while the budget affords it, and while the model of single rounds,
            # once it has measured the episode's batch size twice, does not say it loses (the
            # acceptance rate is learned within a few rounds; what the meters see takes the whole episode).
            # One depth through the episode where new batch shapes cost (see _start_episode); elsewhere the
            # depth follows the model round by round.
            held = self.depth if self._warms_up() else None
            depth = min(held, limit) if held is not None else k
            if held is not None and depth < held and not self._warm(depth + 1):
                return 0   # the end of the call cuts the depth: not worth warming up a size for a round
            measured = len(self.samples.get(depth + 1, ())) >= 2   # the least of two: past a hiccup
            if affordable and not (measured and self._depth_rate(depth, pending) * t1 < 1.0):
                if self.depth is None:
                    self.depth = self.last_depth = k
                return depth
            self._end_episode()
            return 0
        if self._drafting_pays(limit, self.MARGIN):
            if affordable:
                self._start_episode(k)
                return k
            return 0                       # out of step: catch_up_now() brings it in step as affordable
        self.plain_rounds += 1
        if self.plain_rounds < self.backoff:
            return 0
        worst = self.catchup_cost(pending) + k * self.step_cost() + self.verify_cost(k + 1) - t1
        if worst > self._allowance(0.5 * self.SLACK * t1):
            return 0
        self._start_episode(k)                      # a probe
        return k

    def _start_episode(self, depth: int | None) -> None:
        """Draft for the next EPISODE drafting rounds, at one depth (None: chosen at the episode's first
        draft): a GPU pays for each change of batch shape (0.5-0.9 ms on the H100 with SmolLM2-135M, against
        1.1 ms for a token) and for each new shape's first two runs in a context (see update)."""
        self.episode, self.plain_rounds = self.EPISODE, 0
        self.depth = depth
        if depth is not None:
            self.last_depth = depth

    def _end_episode(self) -> None:
        """Stop drafting; the next probe waits twice as long as the last."""
        self.episode, self.plain_rounds = 0, 0
        self.backoff = min(self.backoff * 2, 64)

    def catch_up_now(self, limit: int, pending: int) -> int:
        """After a plain round: how many of the `pending` tokens a draft model should decode now, in one batch,
        to get back in step: only while drafting in step would pay, and no more than the allowance pays for
        (at least 8 at a time, so that the batch's cost per token is measured for what it is). 0: none."""
        if self.cost_free or not self.adaptive or pending <= 2 or 1 not in self.samples:
            return 0
        if not self._drafting_pays(limit, self.MARGIN):
            return 0
        per = self.catchup_cost(2)
        allowance = self._allowance(self.SLACK * self.verify_cost(1))
        n = min(pending - 1, int(allowance / per) if per > 0 else pending - 1)
        return n if n >= min(8, pending - 1) else 0

    def caught_up(self, n: int, seconds: float) -> None:
        """A catch-up of `n` tokens took `seconds` (charged to speculation until drafting pays it back)."""
        if n:
            self._add(self.catchup_samples, seconds / n, self.WINDOW)
        self.elapsed += seconds
        self.debt += seconds
        self.meters["draft"][0] += seconds

    def _meter(self, regime: str, seconds: float, tokens: int) -> None:
        m, d = self.meters[regime], self.METER_DECAY
        m[0], m[1], m[2] = m[0] * d + seconds, m[1] * d + tokens, m[2] * d + 1

    def update(self, drafted: int, accepted: int, t_draft: float, t_verify: float, *, steps: int = 0,
               catchup: tuple[int, float] = (0, 0.0)) -> None:
        """Learn from one round: `drafted` tokens proposed (0: a plain round), `accepted` of them,
        seconds drafting (`catchup` included: (tokens, seconds) of it spent catching up) and verifying;
        `steps`: drafter steps taken (default `drafted`)."""
        size = drafted + 1
        t_round = t_draft + t_verify
        self.elapsed += t_round
        runs = self.memory["runs"]
        n_run = runs.get(size, 0)
        runs[size] = n_run + 1
        aside = self.warmed_up.get(size)
        # Only a batch size's first two runs in the context can be a warm-up: predict its cost for those alone.
        predicted = self.verify_cost(size) if size > 1 and n_run < 2 and 1 in self.samples else math.inf
        if size > 1 and self._warms_up() and (n_run == 0 or (n_run == 1 and aside)) \
                and t_verify > (self.WARMUP if n_run == 0 else self.WARMUP / 2) * predicted:
            # The first two batches of a new size in this context, over what the curve predicts: run without
            # a CUDA graph, then captured into one (H100, SmolLM2: 4.5-22 ms, then 6-11 ms, then 1.3-1.6 ms,
            # against 1.1 ms for one token). Neither a cost to learn nor one to hold against drafting: they
            # are charged at the predicted cost. Only the first size warmed up is free, an investment made
            # once per context: warming up more sizes is charged in full, so that what a bad drafter costs
            # stays bounded.
            first = not self.warmed_up or next(iter(self.warmed_up)) == size
            t_round = t_draft + (predicted if first else t_verify)
            self.warmed_up.setdefault(size, []).append((t_verify, predicted, t_round - t_draft))
        else:
            if aside and size not in self.samples and t_verify >= 0.9 * aside[-1][0]:
                # The cost stayed: it was the batch's cost, not a warm-up. Charge what was let off.
                self.debt += sum(seconds - charged for seconds, _, charged in aside)
            self._add(self.samples.setdefault(size, []), t_verify, self.WINDOW)
            self._curve = None
            if size == 1 and runs[1] == self.BASELINE == len(self.samples[1]):
                # The context's first one-token decodes: slow at first where the backend is.
                ones = self.samples[1]
                self.memory["warms_up"] = max(ones[:2]) > self.WARMUP * min(ones)
        if drafted:
            self.since_draft = 0
        elif self.since_draft is not None:
            self.since_draft += 1
        if drafted or (self.since_draft is not None and self.since_draft <= self.TAIL):
            # A round of the draft regime (drafting, or right after: a GPU rebuilds and replays its one-token
            # graph then): what it cost beyond plain decoding of the tokens it emitted.
            self.debt += t_round - (accepted + 1) * self.verify_cost(1)
            self._meter("draft", t_round, accepted + 1)
            if drafted and self.episode:
                self.episode -= 1
                if not self.episode:       # judge the episode by what drafting measured against plain decoding
                    if self._drafting_pays(1, 1.0):
                        self._start_episode(None)
                        self.backoff = 4
                    else:
                        self._end_episode()
        else:
            self._meter("plain", t_round, accepted + 1)
        if not drafted:
            return
        n_catchup, t_catchup = catchup
        if n_catchup > 0:
            self._add(self.catchup_samples, t_catchup / n_catchup, self.WINDOW)
        steps = steps or drafted
        if not self.cost_free:
            self._add(self.step_samples, max(t_draft - t_catchup, 0.0) / steps, self.WINDOW)
        rejected = 1 if accepted < drafted else 0
        self.acc = self.acc * self.DECAY + accepted
        self.rej = self.rej * self.DECAY + rejected
