"""Rollouts for Draft-OPD: target-assisted speculative decoding with recording on.

This is the rollout worker's job (docs/design.md §1): one ``RolloutRecord`` (docs/design.md §3) per
sequence.
Two modes write the same records:
- ``engine``: the inference engine itself, one sequence at a time (any temperature);
- ``batched``: greedy only; the batched passes of ``greedy_rollouts`` (a test checks that its
  records equal the engine's).
"""

from __future__ import annotations

from collections.abc import Sequence

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.records import RolloutRecord
from draftopd.speculative.sampling import SamplingParams
from draftopd.training.configs import ROLLOUT_MODES, check_rollout_mode
from draftopd.training.opd.greedy_rollouts import TargetOutputs, batched_greedy_rollouts


def make_rollouts(
    target: TargetModel,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    job_id: str = "local",
    drafter_version: str = "0",
    mode: str = "engine",
    batch_size: int = 8,
    texts: Sequence[Sequence[int]] | None = None,
    target_outputs: TargetOutputs | None = None,
) -> list[RolloutRecord]:
    """Speculative decoding of each prompt with recording on: one record per sequence.
    ``batch_size``, ``texts`` (the prompts' greedy continuations, when known) and
    ``target_outputs`` (``batched_greedy_rollouts``) are for the batched mode only."""
    check_rollout_mode(mode, temperature)
    if (texts is not None or target_outputs is not None) and mode != "batched":
        raise ValueError("texts and target_outputs are for the batched greedy mode")
    if mode == "batched":
        return batched_greedy_rollouts(
            target,
            drafter,
            prompts,
            num_draft_tokens=num_draft_tokens,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            job_id=job_id,
            drafter_version=drafter_version,
            texts=texts,
            target_outputs=target_outputs,
        )
    engine = DecodeEngine(target, num_draft_tokens=num_draft_tokens)
    was_training = drafter.training
    drafter.eval()
    records = []
    try:
        for index, ids in enumerate(prompts):
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seeds is None else int(seeds[index]),
            )
            # float32 drafting: the records must be what the float32 training drafter proposes
            proposer = drafter.proposer(weights="float32")
            result = engine.generate(
                list(ids), params, proposer=proposer, record=True, decode_text=False
            )
            records.append(
                RolloutRecord.from_result(
                    result,
                    params,
                    job_id=job_id,
                    drafter_version=drafter_version,
                    target_model=target.name,
                )
            )
    finally:
        drafter.train(was_training)
    return records


def fresh_records(
    records: Sequence[RolloutRecord], current_version: int, max_lag: int
) -> list[RolloutRecord]:
    """Records made within ``max_lag`` versions of the current one (versions are integers)."""
    return [r for r in records if current_version - int(r.drafter_version) <= max_lag]


def rollout_tau(records: Sequence[RolloutRecord]) -> float:
    """Acceptance length over a batch of records: committed tokens / cycles."""
    cycles = sum(len(r.cycles) for r in records)
    return sum(len(r.response_ids) for r in records) / cycles if cycles else 0.0


__all__ = ["ROLLOUT_MODES", "check_rollout_mode", "fresh_records", "make_rollouts", "rollout_tau"]
