"""Prometheus metrics of one app instance (its own ``CollectorRegistry``).

Speculative counters are labelled by ``drafter_version``: the drafter version string, ``ngram``, or
``none`` for plain decoding. From them, per version:
- tau = generated_tokens / cycles (when no request was cut by a stop string);
- acceptance rate = accepted_tokens / draft_tokens;
- acceptance at slot j = accepted_by_position{position=j} / drafts;
- tokens/s = generated_tokens / decode_seconds.
The gauges ``draftopd_live_tau`` and ``draftopd_live_tokens_per_s`` give the last two ready-made
(cumulative since the instance started), and ``draftopd_canary_traffic_share`` the share of
requests routed to the candidate drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from draftopd.speculative.engine import DecodeStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class RunRecord:
    """What one finished (or abandoned) generation adds to the counters."""

    drafter_label: str  # drafter version, "ngram" or "none"
    stats: DecodeStats
    generated_tokens: int  # output tokens (after EOS / stop-string cuts)
    finished: bool  # False when the client went away before the end


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        label = ["drafter_version"]
        r = self.registry
        self.drafts = Counter(
            "draftopd_spec_drafts_total", "Cycles that proposed >= 1 draft.", label, registry=r
        )
        self.draft_tokens = Counter(
            "draftopd_spec_draft_tokens_total", "Draft tokens proposed.", label, registry=r
        )
        self.accepted_tokens = Counter(
            "draftopd_spec_accepted_tokens_total", "Draft tokens accepted.", label, registry=r
        )
        self.accepted_by_position = Counter(
            "draftopd_spec_accepted_by_position_total",
            "Draft tokens accepted at slot position (1-based).",
            [*label, "position"],
            registry=r,
        )
        self.cycles = Counter(
            "draftopd_spec_cycles_total", "Verification cycles (target passes).", label, registry=r
        )
        self.decode_seconds = Counter(
            "draftopd_spec_decode_seconds_total", "Decode seconds (prefill excluded).", label,
            registry=r,
        )  # fmt: skip
        self.live_tau = Gauge(
            "draftopd_live_tau", "Committed tokens per cycle on served traffic.", label, registry=r
        )
        self.live_tokens_per_s = Gauge(
            "draftopd_live_tokens_per_s", "Generated tokens per decode second.", label, registry=r
        )
        self.canary_share = Gauge(
            "draftopd_canary_traffic_share",
            "Share of drafter requests routed to the candidate (0: no canary).",
            registry=r,
        )
        self._totals: dict[str, list[float]] = {}  # label -> [committed, cycles, tokens, seconds]
        self.generated_tokens = Counter(
            "draftopd_generated_tokens_total", "Output tokens returned.", label, registry=r
        )
        self.requests = Counter(
            "draftopd_requests_total",
            "Generation requests by endpoint and outcome (finished | cancelled).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "draftopd_request_latency_seconds",
            "Generation request latency (queueing and streaming included).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.drafter_swaps = Counter(
            "draftopd_drafter_swaps_total",
            "Registry versions swapped in, refused (bad artifact) or failed (transient).",
            ["outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "draftopd_requests_in_flight", "Generation requests admitted or waiting.", registry=r
        )
        self.queue_depth = Gauge(
            "draftopd_queue_depth", "Admitted requests waiting for a generation slot.", registry=r
        )
        self.rejected = Counter(
            "draftopd_requests_rejected_total",
            "Generation requests refused with 429 because the wait queue was full.",
            registry=r,
        )

    def record_run(self, endpoint: str, record: RunRecord, seconds: float) -> None:
        version, stats = record.drafter_label, record.stats
        self.drafts.labels(version).inc(stats.drafts)
        self.draft_tokens.labels(version).inc(stats.draft_tokens)
        self.accepted_tokens.labels(version).inc(stats.accepted_tokens)
        self.cycles.labels(version).inc(stats.cycles)
        for position, accepted in enumerate(stats.accepted_by_position, start=1):
            self.accepted_by_position.labels(version, str(position)).inc(accepted)
        self.generated_tokens.labels(version).inc(record.generated_tokens)
        self.decode_seconds.labels(version).inc(stats.decode_s)
        totals = self._totals.setdefault(version, [0.0, 0.0, 0.0, 0.0])
        for index, value in enumerate(
            (stats.committed, stats.cycles, record.generated_tokens, stats.decode_s)
        ):
            totals[index] += value
        if totals[1]:
            self.live_tau.labels(version).set(totals[0] / totals[1])
        if totals[3] > 0:
            self.live_tokens_per_s.labels(version).set(totals[2] / totals[3])
        outcome = "finished" if record.finished else "cancelled"
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
