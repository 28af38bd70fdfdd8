"""The server's counters and their Prometheus text form (GET /metrics).

Counters only grow (Prometheus computes rates from them); the generation rate over the last RATE_WINDOW
seconds is given as well, for a glance without a Prometheus server. The gauges (queue depth, slots busy) are
read from the engine (or the serial queue) when /metrics is asked, not stored here.
"""

from __future__ import annotations

import collections
import threading
import time

RATE_WINDOW = 10.0  # seconds over which llmplace_generation_tokens_per_second is measured


class Metrics:
    """Thread-safe counters of one server: tokens, requests by HTTP status, and recent generation times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.requests: collections.Counter[str] = collections.Counter()  # status ("200", "429", "disconnected")
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) in the window
        self.started = time.monotonic()

    def count_request(self, status: int | str) -> None:
        with self._lock:
            self.requests[str(status)] += 1

    def count_prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def count_generated(self, tokens: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += tokens
            self._recent.append((now, tokens))
            self._forget_before(now - RATE_WINDOW)

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW seconds (less right after the start)."""
        now = time.monotonic()
        with self._lock:
            self._forget_before(now - RATE_WINDOW)
            total = sum(n for _, n in self._recent)
        return total / max(min(RATE_WINDOW, now - self.started), 1e-3)

    def _forget_before(self, oldest: float) -> None:
        recent = self._recent
        while recent and recent[0][0] < oldest:
            recent.popleft()

    def prometheus(self, *, queue_depth: int, slots_busy: int, slots_total: int) -> str:
        """The Prometheus text exposition format (version 0.0.4) of the counters and the gauges given."""
        rate = self.tokens_per_second()
        with self._lock:
            generated, prompt, requests = self.generated_tokens, self.prompt_tokens, dict(self.requests)
        lines = []

        def metric(name: str, kind: str, help_text: str, samples) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        metric("llmplace_generated_tokens_total", "counter", "Tokens generated since the server started.",
               [("", generated)])
        metric("llmplace_prompt_tokens_total", "counter", "Prompt tokens of the requests served.", [("", prompt)])
        metric("llmplace_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {RATE_WINDOW:g} seconds.", [("", float(rate))])
        metric("llmplace_queue_depth", "gauge", "Requests waiting for a slot.", [("", queue_depth)])
        metric("llmplace_slots_busy", "gauge", "Slots generating or prefilling a request.", [("", slots_busy)])
        metric("llmplace_slots_total", "gauge", "Slots (sequences decoded together).", [("", slots_total)])
        metric("llmplace_requests_total", "counter",
               "Requests answered, by HTTP status (\"disconnected\": the client left before the answer).",
               [(f'{{status="{status}"}}', count) for status, count in sorted(requests.items())])
        return "\n".join(lines) + "\n"
