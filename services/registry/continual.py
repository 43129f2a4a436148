"""Continual Draft-OPD jobs: a round of training each time enough new traffic has arrived.

``POST /train-jobs`` with ``continual: {"min_new_prompts": N, "traffic": s}`` and a ``draft_opd``
spec whose prompts are captured traffic stores a *continual job*. It is never sent to the
trainer itself; the registry's controller (``controller.py``) runs its rounds:

1. ``waiting``: once N new distinct prompts were captured (stream entries after the previous
   round's last one), a round job is submitted: the same spec, starting from the version that
   ``production`` names (``opd.drafter = registry://NAME/V``, ``base_version = V``), writing
   under ``<out_dir>/round-<k>``, with ``parent_id`` naming the continual job.
2. ``training``: when the round job succeeds, its newest version becomes ``candidate`` with the
   traffic share ``s`` (an alias event with cause ``continual:<job id>``). A failed or cancelled
   round is recorded and the job waits for the next N prompts.
3. ``canary``: the live-τ policy (``policy.py``) promotes or discards the candidate; the round's
   outcome (from the alias events) is recorded in ``continual.history``.

The state lives in ``train_jobs.continual`` (``schedule``, ``state``, ``history``). Cancelling
the job cancels its running round. With ``max_rounds`` the job succeeds after that many rounds.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from draftopd.wire.traffic import parse_traffic_ref, read
from services.registry import aliases, jobs, repository
from services.registry.errors import QueueUnavailableError
from services.registry.events import AliasEvents
from services.registry.jobs import WAITING
from services.registry.models import AliasEvent, TrainJob, utcnow
from services.registry.policy import CANDIDATE, PRODUCTION
from services.registry.queue import TrainQueue
from services.registry.schemas import TrainJobCreate

logger = logging.getLogger(__name__)

TRAINING, CANARY = "training", "canary"


class ContinualRunner:
    def __init__(self, queue: TrainQueue, events: AliasEvents, redis: Any, base_url: str) -> None:
        self.queue = queue
        self.events = events
        self.redis = redis
        self.base_url = base_url

    def run_once(self, session: Session) -> None:
        parents = session.scalars(
            select(TrainJob).where(
                TrainJob.continual.is_not(None), TrainJob.status.in_(("queued", "running"))
            )
        ).all()
        for parent in parents:
            try:
                self._advance(session, parent.id)
            except Exception:  # one job's trouble must not stop the others' rounds
                session.rollback()
                logger.exception("continual job %s: this tick failed", parent.id)

    def _advance(self, session: Session, job_id: str) -> None:
        session.expire_all()
        parent = jobs.get_job(session, job_id)
        data = copy.deepcopy(parent.continual or {})
        if "state" not in data:  # not a continual job (a JSON null from an older row)
            return
        state, history = data["state"], data["history"]
        round_job = jobs.find_job(session, state["job"]) if state.get("job") else None
        if parent.cancel_requested:
            if round_job is not None and not round_job.finished:
                jobs.cancel_job(session, round_job)
            self._save(session, parent.id, data, status="cancelled")
            return
        phase = state["phase"]
        if phase == WAITING:
            self._maybe_start_round(session, parent, data)
        elif phase == TRAINING and round_job is not None and round_job.finished:
            if round_job.status == "succeeded" and round_job.versions:
                version = round_job.versions[-1].number
                aliases.move_alias(
                    session, self.events, parent.drafter, CANDIDATE, version,
                    base_url=self.base_url, traffic=float(data["schedule"]["traffic"]),
                    cause=f"continual:{parent.id}",
                )  # fmt: skip
                state.update(phase=CANARY, version=version)
                self._save(session, parent.id, data, tau=round_job.tau)
            else:
                history.append(
                    {"round": state["round"], "job": round_job.id, "version": None,
                     "outcome": f"training {round_job.status}: {round_job.error or ''}"[:500]}
                )  # fmt: skip
                self._next_round(session, parent, data)
        elif phase == CANARY:
            outcome = self._canary_outcome(session, parent, int(state["version"]))
            if outcome is not None:
                history.append(
                    {"round": state["round"], "job": state["job"], "version": state["version"],
                     "outcome": outcome}
                )  # fmt: skip
                self._next_round(session, parent, data)

    def _maybe_start_round(self, session: Session, parent: TrainJob, data: dict[str, Any]) -> None:
        state, schedule = data["state"], data["schedule"]
        source = parse_traffic_ref(parent.spec["run"]["prompts"])
        assert source is not None  # checked when the job was created
        after = state.get("stream_id") or "0"
        entries = read(self.redis, stream=source.stream, after=after)
        new = {record.key for _, record in entries}
        if len(new) < int(schedule["min_new_prompts"]):
            return
        production = repository.find_alias(session, parent.drafter, PRODUCTION)
        if production is None:
            return  # nothing to train from yet
        number = production.version.number
        spec = copy.deepcopy(parent.spec)
        spec["run"]["out_dir"] = f"{spec['run']['out_dir'].rstrip('/')}/round-{state['round']:03d}"
        spec["opd"]["drafter"] = f"registry://{parent.drafter.name}/{number}"
        body = TrainJobCreate.model_validate(
            {"drafter": parent.drafter.name, "spec": spec, "base_version": number}
        )
        child = jobs.create_job(session, body, parent.drafter, parent_id=parent.id)
        try:
            self.queue.enqueue(child.id, child.spec)
        except QueueUnavailableError as err:
            jobs.fail_job(session, child, str(err))
            logger.warning("continual job %s: round not started (%s)", parent.id, err)
            return
        state.update(phase=TRAINING, job=child.id, version=None, stream_id=entries[-1][0])
        self._save(session, parent.id, data, status="running")
        logger.info(
            "continual job %s: round %d started from %s@%d on %d new prompts (job %s)",
            parent.id, state["round"], parent.drafter.name, number, len(new), child.id,
        )  # fmt: skip

    def _canary_outcome(self, session: Session, parent: TrainJob, version: int) -> str | None:
        """'promoted' / 'discarded' (with the reason) once the canary of ``version`` ended."""
        candidate = repository.find_alias(session, parent.drafter, CANDIDATE)
        if candidate is not None and candidate.version.number == version and candidate.traffic:
            return None  # still running
        event = session.scalars(
            select(AliasEvent)
            .where(
                AliasEvent.drafter_id == parent.drafter_id,
                AliasEvent.alias == CANDIDATE,
                AliasEvent.to_version == version,
                AliasEvent.cause != f"continual:{parent.id}",
            )
            .order_by(AliasEvent.id.desc())
            .limit(1)
        ).one_or_none()
        if event is None:
            return "canary ended by another move of the candidate alias"
        reason = (event.detail or {}).get("reason", "")
        verb = {"canary:promote": "promoted", "canary:discard": "discarded"}.get(event.cause)
        return f"{verb}: {reason}" if verb else f"canary ended ({event.cause})"

    def _next_round(self, session: Session, parent: TrainJob, data: dict[str, Any]) -> None:
        state, schedule = data["state"], data["schedule"]
        state.update(round=state["round"] + 1, phase=WAITING, job=None, version=None)
        done = schedule.get("max_rounds") is not None and state["round"] >= schedule["max_rounds"]
        progress = state["round"] / schedule["max_rounds"] if schedule.get("max_rounds") else None
        self._save(
            session, parent.id, data, status="succeeded" if done else "running", progress=progress
        )

    def _save(self, session: Session, job_id: str, data: dict[str, Any], **values: Any) -> None:
        job = jobs.get_job(session, job_id)
        job.continual = data  # a new object: SQLAlchemy sees the JSON change
        for key, value in values.items():
            if value is not None:
                setattr(job, key, value)
        job.updated_at = utcnow()
        session.commit()
