"""``GET /metrics``: the server's counters in the Prometheus text format (version 0.0.4).

Counters and histograms are plain ints and floats written under the engine thread's lock
(``EngineThread.cond``: the HTTP side counts cancelled queued requests and 429s; a reader on
another thread sees a value at most one step old); gauges come from the engine thread's
snapshot taken after every step (requests running / waiting, KV slots used / free / held by
the prefix cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PARALLEL_BUCKETS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        if not math.isfinite(v):
            return
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6g}", f"{name}_count {self.n}"]
        return out


@dataclass(slots=True)
class Metrics:
    tokens: int = 0  # generated tokens, all branches, engine-inserted ones included
    forks: int = 0  # forked blocks
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    aborted: int = 0  # client gone, timeout or shutdown
    timeouts: int = 0
    rejected: int = 0  # 429: the admission queue was full
    errors: int = 0
    parallel: Histogram = field(default_factory=lambda: Histogram(PARALLEL_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))

    def observe(self, out: Any) -> None:
        """A request finished (or was aborted) with output ``out``."""
        self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1
        u = out.usage
        if u.completion_tokens:
            self.parallel.observe(float(u.parallel_degree))
            self.tpot.observe(float(u.seconds) / max(u.depth_tokens, 1))

    def render(self, snapshot: dict[str, float]) -> str:
        g = snapshot.get
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        metric("multiverse_requests_running", "gauge", "Requests in the engine's running batch.",
               [f"multiverse_requests_running {g('running', 0):g}"])
        metric("multiverse_requests_waiting", "gauge", "Requests waiting for admission.",
               [f"multiverse_requests_waiting {g('waiting', 0):g}"])
        metric("multiverse_kv_slots_total", "gauge", "KV pool size in token slots.",
               [f"multiverse_kv_slots_total {g('kv_total', 0):g}"])
        metric("multiverse_kv_slots_used", "gauge", "KV slots in use (requests and the prefix cache).",
               [f"multiverse_kv_slots_used {g('kv_used', 0):g}"])
        metric("multiverse_kv_slots_free", "gauge", "Free KV slots.",
               [f"multiverse_kv_slots_free {g('kv_free', 0):g}"])
        metric("multiverse_kv_slots_cached", "gauge", "Token slots held by the prefix cache.",
               [f"multiverse_kv_slots_cached {g('kv_cached', 0):g}"])
        metric("multiverse_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [f"multiverse_prefix_cache_query_tokens_total {int(g('cache_queried', 0))}"])
        metric("multiverse_prefix_cache_hit_tokens_total", "counter", "Of those, tokens found cached.",
               [f"multiverse_prefix_cache_hit_tokens_total {int(g('cache_hits', 0))}"])
        metric("multiverse_generation_tokens_total", "counter", "Generated tokens, all branches.",
               [f"multiverse_generation_tokens_total {self.tokens}"])
        metric("multiverse_forks_total", "counter", "Forked <Parallel> blocks.",
               [f"multiverse_forks_total {self.forks}"])
        metric("multiverse_requests_finished_total", "counter", "Finished requests by finish reason.",
               [f'multiverse_requests_finished_total{{finish_reason="{k}"}} {v}'
                for k, v in sorted(self.finished.items())])  # fmt: skip
        metric("multiverse_requests_aborted_total", "counter", "Requests aborted (client gone, timeout, shutdown).",
               [f"multiverse_requests_aborted_total {self.aborted}"])
        metric("multiverse_requests_timeout_total", "counter", "Requests aborted at their timeout.",
               [f"multiverse_requests_timeout_total {self.timeouts}"])
        metric("multiverse_requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
               [f"multiverse_requests_rejected_total {self.rejected}"])
        metric("multiverse_request_errors_total", "counter", "Requests that failed in the engine.",
               [f"multiverse_request_errors_total {self.errors}"])
        metric("multiverse_parallel_degree", "histogram", "# parallel of finished requests.",
               self.parallel.lines("multiverse_parallel_degree"))
        metric("multiverse_time_per_output_token_seconds", "histogram",
               "Seconds per sequential output position of finished requests.",
               self.tpot.lines("multiverse_time_per_output_token_seconds"))
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """``{sample name with labels: value}`` of a Prometheus text page (for tests and tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
