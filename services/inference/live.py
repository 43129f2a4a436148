"""Live metrics: per registry version, what served requests measured, reported to the registry.

``LiveCounters`` sums, per served version, the finished drafter requests: cycles, the sum of
accepted drafts over cycles and of their squares (so the registry has the variance of per-cycle
τ), generated tokens and decode seconds. ``LiveReporter`` (a daemon thread) sends each registry
version's counters since its previous report every ``live_report_s`` to
``POST /drafters/{name}/versions/{v}/live-metrics``, numbered ``(instance, seq)``: a report whose
answer was lost is re-sent with the same number and counts once. A report the registry could not
take (unreachable, a 5xx, 408, 429) stays queued, in order, and is re-sent at the next interval
(at most ``MAX_QUEUED`` are kept); one it refuses for good (a 404: the version is gone; a 401 or
403: the token) is dropped. A problem is logged when it starts or changes, not at every try.

Squares without per-cycle records: acceptance is a prefix, so ``accepted_by_position[j-1]`` is
the number of cycles that accepted at least j drafts, and the sum of a² over cycles is
``Σ_j (2j − 1) · accepted_by_position[j-1]``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import httpx

from draftopd.speculative.engine import DecodeStats
from draftopd.wire.live import LiveCounts
from draftopd.wire.registry_client import RegistryClient, RegistryError

logger = logging.getLogger(__name__)
MAX_QUEUED = 10_000  # unacknowledged reports kept while the registry is unreachable


def run_counts(stats: DecodeStats, generated_tokens: int) -> LiveCounts:
    """One finished request's counts (the squares from ``accepted_by_position``, see above)."""
    squares = sum((2 * j - 1) * n for j, n in enumerate(stats.accepted_by_position, start=1))
    return LiveCounts(
        requests=1,
        cycles=stats.cycles,
        accepted=stats.accepted_tokens,
        accepted_sq=squares,
        generated_tokens=generated_tokens,
        decode_s=stats.decode_s,
    )


class LiveCounters:
    """Thread-safe per-version sums since the last ``take``."""

    def __init__(self, drafter_name: str) -> None:
        self.prefix = f"{drafter_name}@"
        self._lock = threading.Lock()
        self._tallies: dict[int, LiveCounts] = {}

    def add(self, version_label: str, stats: DecodeStats, generated_tokens: int) -> None:
        """Count one finished request served by ``version_label`` (registry versions only)."""
        number = version_label.removeprefix(self.prefix)
        if not version_label.startswith(self.prefix) or not number.isdigit():
            return
        with self._lock:
            self._tallies.setdefault(int(number), LiveCounts()).add(
                run_counts(stats, generated_tokens)
            )

    def take(self) -> dict[int, LiveCounts]:
        with self._lock:
            taken, self._tallies = self._tallies, {}
        return taken


class LiveReporter:
    def __init__(
        self, counters: LiveCounters, client: RegistryClient, name: str, interval_s: float
    ) -> None:
        self.counters = counters
        self.client = client
        self.name = name
        self.interval_s = interval_s
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"[:128]
        self._seq = 0
        self._queue: list[
            tuple[int, int, LiveCounts]
        ] = []  # (version, seq, tally) not yet acknowledged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.last_problem: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="live-reporter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()  # what the last interval counted

    def flush(self) -> None:
        """Send everything counted so far. A report keeps its number until the registry has
        answered it, so a retry after a lost answer is recognised as a repeat."""
        for version, tally in sorted(self.counters.take().items()):
            self._queue.append((version, self._next_seq(), tally))
        if len(self._queue) > MAX_QUEUED:
            dropped = len(self._queue) - MAX_QUEUED
            logger.warning("registry unreachable: dropping the %d oldest live reports", dropped)
            del self._queue[:dropped]
        kept = []
        for version, seq, tally in self._queue:
            report = {"instance": self.instance, "seq": seq, **tally.report_fields()}
            try:
                self.client.report_live(self.name, version, report)
            except RegistryError as err:
                retry = err.status_code >= 500 or err.status_code in (408, 429)
                if retry:
                    kept.append((version, seq, tally))
                # a 404 (the version is gone) or another 4xx (a 401/403: the token; a 422)
                # will not pass by retrying: the report is dropped
                self._problem(f"live report refused ({err}); {'retrying' if retry else 'dropped'}")
                continue
            except (httpx.HTTPError, OSError) as err:
                kept.append((version, seq, tally))
                self._problem(f"live report not sent ({err!r}); retrying")
                continue
            self.sent += 1
            self._problem(None)
        self._queue = kept

    def _problem(self, problem: str | None) -> None:
        """Log a problem when it starts or changes, not at every interval."""
        if problem is not None and problem != self.last_problem:
            logger.warning("%s", problem)
        self.last_problem = problem

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # never let the reporter die
                logger.exception("live metrics report failed")
