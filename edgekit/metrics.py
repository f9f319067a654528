"""Prometheus text-format metrics for the server: histograms, counters and gauges, no dependencies."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Histogram:
    def __init__(self, name: str, doc: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.doc = name, doc
        self.buckets = tuple(buckets) + (float("inf"),)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {c}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class Counter:
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()) or [((), 0.0)]:
            out.append(f"{self.name}{_labels(dict(key))} {v!r}")
        return out


class Gauge:
    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} gauge", f"{self.name} {float(self.read())!r}"]


class ServerMetrics:
    """The server's metrics; ``observe_*`` may be called from any thread."""

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram("edgekit_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("edgekit_inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = Histogram("edgekit_e2e_request_latency_seconds", "Time from request arrival to its last token.")
        self.queue = Histogram("edgekit_request_queue_time_seconds", "Time a request waited before its prefill.")
        self.prompt_tokens = Counter("edgekit_prompt_tokens_total", "Prompt tokens processed.")
        self.cached_tokens = Counter("edgekit_prompt_cached_tokens_total", "Prompt tokens from the prefix cache.")
        self.generation_tokens = Counter("edgekit_generation_tokens_total", "Tokens generated.")
        self.requests = Counter("edgekit_requests_total", "Finished requests by finish reason.")
        self.rejected = Counter("edgekit_requests_rejected_total", "Requests refused, by reason.")
        self.drafted = Counter("edgekit_spec_drafted_tokens_total", "Speculative decoding: tokens drafted.")
        self.accepted = Counter("edgekit_spec_accepted_tokens_total", "Speculative decoding: drafted tokens kept.")
        self._all = [
            Gauge("edgekit_requests_running", "Requests decoding now.", running),
            Gauge("edgekit_requests_waiting", "Requests waiting for a batch slot.", waiting),
            self.ttft, self.itl, self.e2e, self.queue,
            self.prompt_tokens, self.cached_tokens, self.generation_tokens, self.requests, self.rejected,
            self.drafted, self.accepted,
        ]

    def observe(self, metric: Histogram, value: float) -> None:
        with self._lock:
            metric.observe(value)

    def count(self, metric: Counter, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            metric.inc(amount, **labels)

    def render(self) -> str:
        with self._lock:
            return "\n".join(line for m in self._all for line in m.render()) + "\n"
