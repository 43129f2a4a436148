"""The live-τ policy: promote or discard a canary, and roll back a bad ``production`` swap.

Both decisions compare two versions' live τ (``live.LiveStats``: committed tokens per cycle, with
its standard error over cycles) with a confidence bound ``z``:

- **Canary.** While ``candidate`` has a traffic share > 0, its live τ since the share was set is
  compared with ``production``'s over the same window. Once each side has ``canary_min_cycles``:
  promote when ``Δ − z·se > canary_min_gain`` (better), discard when ``Δ + z·se < 0`` (worse),
  where ``Δ = τ_candidate − τ_production`` and ``se`` is the standard error of Δ. A candidate
  that is neither after ``canary_max_cycles`` cycles is discarded as inconclusive.
  Promoting moves ``production`` to the candidate's version; promoting or discarding sets the
  candidate's share to 0. Both are alias events with the figures in ``detail``.
- **Guard.** For ``guard_window_s`` after any move of ``production`` (an explicit PUT, a job's
  ``promote_to``, a promotion; not a rollback), the new version's live τ since the move is
  compared with the previous version's over the ``guard_lookback_s`` before it. Once the new one
  has ``guard_min_cycles``: roll back when ``τ_new + z·se < 1 + (1 − guard_margin)·(τ_previous
  − 1)``, i.e. when the new version lost more than ``guard_margin`` of the previous one's
  speculative gain (the tokens a cycle commits beyond the one plain decoding would). The margin
  is on the gain, not on τ, so a drafter with a small gain (τ 1.07) is guarded as well as one
  with a large gain (τ 2.6). A silently broken drafter (τ ≈ 1.0) loses all of it and is caught
  within the first reports. No
  baseline (the previous version served fewer cycles than ``guard_min_cycles`` in the lookback)
  means no judgement.

Every decision re-reads the alias before it moves it, so a move made meanwhile is not undone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry import aliases, live, repository
from services.registry.errors import NotFoundError
from services.registry.events import AliasEvents
from services.registry.live import LiveStats
from services.registry.models import AliasEvent, Drafter, utcnow

logger = logging.getLogger(__name__)

PRODUCTION, CANDIDATE = "production", "candidate"
PROMOTE, DISCARD, ROLLBACK = "canary:promote", "canary:discard", "guard:rollback"


@dataclass(frozen=True)
class Policy:
    z: float = 1.96
    canary_min_cycles: int = 200
    canary_max_cycles: int = 20000
    canary_min_gain: float = 0.0
    guard_window_s: float = 600.0
    guard_min_cycles: int = 100
    guard_margin: float = 0.5
    guard_lookback_s: float = 3600.0


@dataclass(frozen=True)
class Verdict:
    action: Literal["promote", "discard", "rollback", "wait", "keep"]
    reason: str
    detail: dict[str, Any]


def _figures(prefix: str, stats: LiveStats) -> dict[str, Any]:
    return {
        f"{prefix}_tau": stats.tau,
        f"{prefix}_tau_stderr": stats.stderr,
        f"{prefix}_cycles": stats.cycles,
        f"{prefix}_requests": stats.requests,
        f"{prefix}_tokens_per_s": stats.tokens_per_s,
    }


def _diff_stderr(a: LiveStats, b: LiveStats) -> float:
    return math.sqrt((a.stderr or 0.0) ** 2 + (b.stderr or 0.0) ** 2)


def judge_canary(candidate: LiveStats, production: LiveStats, policy: Policy) -> Verdict:
    detail = {**_figures("candidate", candidate), **_figures("production", production)}
    if min(candidate.cycles, production.cycles) < policy.canary_min_cycles:
        return Verdict("wait", "too few cycles", detail)
    assert candidate.tau is not None and production.tau is not None
    delta = candidate.tau - production.tau
    bound = policy.z * _diff_stderr(candidate, production)
    detail.update(delta=delta, bound=bound, z=policy.z)
    if delta - bound > policy.canary_min_gain:
        return Verdict("promote", f"live tau better by {delta:.3f} (> {bound:.3f})", detail)
    if delta + bound < 0:
        return Verdict("discard", f"live tau worse by {-delta:.3f} (> {bound:.3f})", detail)
    if candidate.cycles >= policy.canary_max_cycles:
        return Verdict("discard", f"inconclusive after {candidate.cycles} cycles", detail)
    return Verdict("wait", "inconclusive so far", detail)


def judge_swap(new: LiveStats, previous: LiveStats, policy: Policy) -> Verdict:
    detail = {**_figures("new", new), **_figures("previous", previous)}
    if previous.cycles < policy.guard_min_cycles:
        return Verdict("keep", "no baseline: the previous version served too few cycles", detail)
    if new.cycles < policy.guard_min_cycles:
        return Verdict("wait", "too few cycles", detail)
    assert new.tau is not None and previous.tau is not None
    floor = 1.0 + (1.0 - policy.guard_margin) * (previous.tau - 1.0)
    bound = policy.z * _diff_stderr(new, previous)
    detail.update(floor=floor, bound=bound, margin=policy.guard_margin, z=policy.z)
    if new.tau + bound < floor:
        return Verdict(
            "rollback", f"live tau {new.tau:.3f} fell below {floor:.3f} (previous "
            f"{previous.tau:.3f}, less {policy.guard_margin:.0%} of its gain)", detail,
        )  # fmt: skip
    return Verdict("keep", "live tau holds", detail)


class LivePolicy:
    """Applies ``Policy`` to every drafter: one ``run_once`` per controller tick."""

    def __init__(self, policy: Policy, events: AliasEvents, base_url: str) -> None:
        self.policy = policy
        self.events = events
        self.base_url = base_url

    def run_once(self, session: Session) -> list[str]:
        """Check every drafter's canary and its latest production swap; returns the causes of
        the moves made."""
        moves = []
        for drafter in repository.list_drafters(session):
            for check in (self._canary, self._guard):
                move = check(session, drafter)
                if move is not None:
                    moves.append(move)
                    session.expire_all()
        return moves

    # -- the canary ---------------------------------------------------------------------------
    def _canary(self, session: Session, drafter: Drafter) -> str | None:
        candidate = repository.find_alias(session, drafter, CANDIDATE)
        production = repository.find_alias(session, drafter, PRODUCTION)
        if candidate is None or not candidate.traffic or production is None:
            return None
        state = (candidate.version_id, candidate.updated_at, production.version_id)
        if candidate.version_id == production.version_id:
            verdict = Verdict("discard", "the candidate is already production", {})
        else:
            since = candidate.updated_at
            verdict = judge_canary(
                live.stats(session, candidate.version_id, since=since),
                live.stats(session, production.version_id, since=since),
                self.policy,
            )
        if verdict.action == "wait":
            return None
        session.expire_all()  # re-read: act only if nobody moved either alias meanwhile
        candidate = repository.get_alias(session, drafter, CANDIDATE)
        production = repository.get_alias(session, drafter, PRODUCTION)
        if (candidate.version_id, candidate.updated_at, production.version_id) != state:
            return None
        number = candidate.version.number
        detail = {
            **verdict.detail, "reason": verdict.reason, "candidate_version": number,
            "production_version": production.version.number,
        }  # fmt: skip
        cause = PROMOTE if verdict.action == "promote" else DISCARD
        if verdict.action == "promote":
            self._move(session, drafter, PRODUCTION, number, cause, None, detail)
        self._move(session, drafter, CANDIDATE, number, cause, 0.0, detail)
        logger.info("%s %s@%d: %s", cause, drafter.name, number, verdict.reason)
        return cause

    # -- the guard ----------------------------------------------------------------------------
    def _guard(self, session: Session, drafter: Drafter) -> str | None:
        event = session.scalars(
            select(AliasEvent)
            .where(AliasEvent.drafter_id == drafter.id, AliasEvent.alias == PRODUCTION)
            .order_by(AliasEvent.id.desc())
            .limit(1)
        ).one_or_none()
        if (
            event is None
            or event.cause == ROLLBACK
            or event.from_version is None
            or event.from_version == event.to_version
            or utcnow() - event.created_at > timedelta(seconds=self.policy.guard_window_s)
        ):
            return None
        try:
            new = repository.get_version(session, drafter, event.to_version)
            previous = repository.get_version(session, drafter, event.from_version)
        except NotFoundError:  # a deleted version: nothing to roll back to
            return None
        swapped_at: datetime = event.created_at
        lookback = swapped_at - timedelta(seconds=self.policy.guard_lookback_s)
        verdict = judge_swap(
            live.stats(session, new.id, since=swapped_at),
            live.stats(session, previous.id, since=lookback, until=swapped_at),
            self.policy,
        )
        if verdict.action != "rollback":
            return None
        session.expire_all()
        production = repository.get_alias(session, drafter, PRODUCTION)
        if production.version_id != new.id:  # moved meanwhile
            return None
        detail = {
            **verdict.detail, "reason": verdict.reason, "rolled_back_version": new.number,
            "swapped_at": swapped_at.isoformat(), "swap_cause": event.cause,
        }  # fmt: skip
        self._move(session, drafter, PRODUCTION, previous.number, ROLLBACK, None, detail)
        logger.warning(
            "guard: rolled %s production back from v%d to v%d: %s",
            drafter.name, new.number, previous.number, verdict.reason,
        )  # fmt: skip
        return ROLLBACK

    def _move(
        self,
        session: Session,
        drafter: Drafter,
        alias: str,
        number: int,
        cause: str,
        traffic: float | None,
        detail: dict[str, Any],
    ) -> None:
        aliases.move_alias(
            session, self.events, drafter, alias, number, base_url=self.base_url,
            traffic=traffic, cause=cause, detail=detail,
        )  # fmt: skip
