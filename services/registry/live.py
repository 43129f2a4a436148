"""Live metrics: what inference instances measure per served version, and their sums.

Each inference instance reports, every few seconds and per registry version it served, its
counters since the previous report (``LiveReport``): requests, cycles, the sum of accepted drafts
and of their squares over cycles, generated tokens and decode seconds. A report is one row; the
pair (instance, seq) makes a retried report count once.

``LiveStats`` sums rows over a window. Its τ is committed tokens per cycle (accepted + 1, the
bonus token included), so it matches the bench's τ on the same requests when no stop string cuts
them; ``stderr`` treats cycles as independent samples (they are not quite: cycles of one request
are correlated, so the policy's bound is a little optimistic; ``docs/traffic.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from draftopd.wire.live import LiveCounts
from services.registry.models import LiveMetric, Version, utcnow
from services.registry.schemas import LiveOut, LiveReport


@dataclass
class LiveStats(LiveCounts):
    """A version's reports summed over a window."""

    reports: int = 0
    last_report_at: datetime | None = None


def record(session: Session, version: Version, report: LiveReport) -> bool:
    """Store one report; False (nothing stored) when this (instance, seq) was stored before."""
    row = LiveMetric(version_id=version.id, created_at=utcnow(), **report.model_dump())
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True


def stats(
    session: Session,
    version_id: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> LiveStats:
    """The version's reports summed over ``[since, until)`` (open ends: all)."""
    query = select(
        func.count(LiveMetric.id),
        func.coalesce(func.sum(LiveMetric.requests), 0),
        func.coalesce(func.sum(LiveMetric.cycles), 0),
        func.coalesce(func.sum(LiveMetric.accepted), 0),
        func.coalesce(func.sum(LiveMetric.accepted_sq), 0),
        func.coalesce(func.sum(LiveMetric.generated_tokens), 0),
        func.coalesce(func.sum(LiveMetric.decode_s), 0.0),
        func.max(LiveMetric.created_at),
    ).where(LiveMetric.version_id == version_id)
    if since is not None:
        query = query.where(LiveMetric.created_at >= since)
    if until is not None:
        query = query.where(LiveMetric.created_at < until)
    reports, requests, cycles, accepted, accepted_sq, tokens, decode_s, last = session.execute(
        query
    ).one()
    if isinstance(last, str):  # SQLite's max() over the column returns its text
        last = datetime.fromisoformat(last)
    if isinstance(last, datetime) and last.tzinfo is None:  # SQLite drops the offset
        last = last.replace(tzinfo=UTC)
    return LiveStats(
        reports=int(reports),
        requests=int(requests),
        cycles=int(cycles),
        accepted=int(accepted),
        accepted_sq=int(accepted_sq),
        generated_tokens=int(tokens),
        decode_s=float(decode_s),
        last_report_at=last,
    )


def live_out(drafter: str, version: Version, figures: LiveStats, since: datetime | None) -> LiveOut:
    return LiveOut(
        drafter=drafter,
        version=version.number,
        since=since,
        reports=figures.reports,
        requests=figures.requests,
        cycles=figures.cycles,
        tau=figures.tau,
        tau_stderr=figures.stderr,
        tokens_per_s=figures.tokens_per_s,
        last_report_at=figures.last_report_at,
    )
