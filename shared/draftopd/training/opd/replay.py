"""Draft-OPD replay: rebuild the drafter's inference state at every recorded anchor, batched.

A rollout record (docs/design.md §3) lists, per cycle, the anchor, the K proposals, the accepted
count m and the target's log-probs of the rejected proposals. The *anchor plan* turns that into
absolute positions in prompt + response. The *replay forward* is the drafter family's
``draft_from_anchors`` with the recorded proposals as the chain inputs: it puts the drafter in
exactly the state its proposer had at inference.

So one pass serves both streams of docs/draft_opd.md ("Replay and loss"): slots 1..m+1 (stream A;
their inputs are the accepted, i.e. committed, tokens) and slots m+1..K (stream B; from slot m+2
on a chain drafter's inputs include its own rejected token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.records import RolloutRecord
from draftopd.training.data.batches import target_features
from draftopd.training.opd.greedy_rollouts import TargetOutputs
from draftopd.training.opd.loss import OPDLossConfig, OPDLossOutput, opd_loss


@dataclass(frozen=True)
class CyclePlan:
    anchor: int  # absolute position (in prompt + response) of the anchor token
    proposed: tuple[int, ...]  # d_1..d_K (target ids)
    accepted: int  # m
    teacher_logprobs: tuple[float, ...]  # log p(d_k | ...) for k = m+1..K

    @property
    def stream_a_slots(self) -> range:
        """Slots k (1-based) whose state is on the target's text: 1..m+1, capped at K."""
        return range(1, min(self.accepted + 1, len(self.proposed)) + 1)

    @property
    def stream_b_slots(self) -> range:
        """Rejected slots: m+1..K (empty when all K were accepted)."""
        return range(self.accepted + 1, len(self.proposed) + 1)


@dataclass(frozen=True)
class SequencePlan:
    token_ids: tuple[int, ...]  # prompt + response
    prompt_len: int
    cycles: tuple[CyclePlan, ...]
    drafter_version: str = ""


def anchor_plan(record: RolloutRecord) -> SequencePlan:
    """The replay plan of one record; raises ValueError when the record is inconsistent."""
    prompt, response = list(record.prompt_ids), list(record.response_ids)
    if not prompt:
        raise ValueError("record has no prompt tokens")
    cycles: list[CyclePlan] = []
    done = 0  # response tokens committed before the current cycle
    for index, cycle in enumerate(record.cycles):
        k, m = len(cycle.proposed), cycle.accepted
        where = f"cycle {index}"
        if cycle.anchor != done - 1:
            raise ValueError(f"{where}: anchor {cycle.anchor}, expected {done - 1}")
        if not 0 <= m <= k or len(cycle.committed) != m + 1:
            raise ValueError(f"{where}: accepted {m} of {k} with {len(cycle.committed)} committed")
        if list(cycle.committed[:m]) != list(cycle.proposed[:m]):
            raise ValueError(f"{where}: the accepted drafts differ from the committed tokens")
        if response[done : done + m + 1] != list(cycle.committed):
            raise ValueError(f"{where}: committed tokens do not match the response")
        if len(cycle.rejected_teacher_logprobs) != k - m:
            raise ValueError(
                f"{where}: {len(cycle.rejected_teacher_logprobs)} teacher log-probs for "
                f"{k - m} rejected slots"
            )
        cycles.append(
            CyclePlan(
                anchor=len(prompt) + cycle.anchor,
                proposed=tuple(cycle.proposed),
                accepted=m,
                teacher_logprobs=tuple(float(x) for x in cycle.rejected_teacher_logprobs),
            )
        )
        done += m + 1
    if done != len(response):
        raise ValueError(f"cycles commit {done} tokens but the response has {len(response)}")
    return SequencePlan(
        token_ids=tuple(prompt + response),
        prompt_len=len(prompt),
        cycles=tuple(cycles),
        drafter_version=record.drafter_version,
    )


def random_anchor_plan(
    plan: SequencePlan, num_slots: int, generator: torch.Generator
) -> SequencePlan:
    """The ablation "random anchors": as many blocks as ``plan`` has cycles with proposals, at
    uniformly random response anchors, teacher-forced on the target's text (all slots stream A)."""
    length = len(plan.token_ids)
    first = max(plan.prompt_len - 1, 1)  # entry A-1 must exist
    last = length - 2  # at least one token to predict
    blocks = sum(1 for c in plan.cycles if c.proposed)
    if last < first or blocks == 0:
        return SequencePlan(plan.token_ids, plan.prompt_len, (), plan.drafter_version)
    anchors = torch.randint(first, last + 1, (blocks,), generator=generator).tolist()
    cycles = []
    for anchor in sorted(anchors):
        text = plan.token_ids[anchor + 1 : anchor + 1 + num_slots]
        cycles.append(CyclePlan(anchor, tuple(text), len(text), ()))
    return SequencePlan(plan.token_ids, plan.prompt_len, tuple(cycles), plan.drafter_version)


@dataclass(frozen=True)
class ReplayBatch:
    input_ids: torch.Tensor  # [b, T] prompt + response, right-padded
    attention_mask: torch.Tensor  # [b, T]
    anchors: torch.Tensor  # [b, C] absolute anchor positions (1 on padded cycles)
    proposed: torch.Tensor  # [b, C, K] target ids (0 where absent)
    slot_valid: torch.Tensor  # [b, C, K] the cycle proposed a token at this slot
    stream_a: torch.Tensor  # [b, C, K] slot k <= m+1
    stream_b: torch.Tensor  # [b, C, K] slot k >= m+1
    teacher_logprobs: torch.Tensor  # [b, C, K] on stream-B slots, 0 elsewhere
    accepted: torch.Tensor  # [b, C]

    @property
    def num_slots(self) -> int:
        return int(self.proposed.shape[2])

    def to(self, device: torch.device | str) -> ReplayBatch:
        return ReplayBatch(**{k: v.to(device) for k, v in vars(self).items()})


def collate_plans(plans: Sequence[SequencePlan], pad_id: int, num_slots: int) -> ReplayBatch:
    """Pad plans into tensors. ``num_slots`` is K; longer proposals are an error."""
    if not plans:
        raise ValueError("no plans to collate")
    b = len(plans)
    length = max(len(p.token_ids) for p in plans)
    cycles = max(1, max(len(p.cycles) for p in plans))
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    anchors = torch.ones((b, cycles), dtype=torch.long)
    proposed = torch.zeros((b, cycles, num_slots), dtype=torch.long)
    valid = torch.zeros((b, cycles, num_slots), dtype=torch.bool)
    stream_a = torch.zeros_like(valid)
    stream_b = torch.zeros_like(valid)
    teacher = torch.zeros((b, cycles, num_slots))
    accepted = torch.zeros((b, cycles), dtype=torch.long)
    for row, plan in enumerate(plans):
        input_ids[row, : len(plan.token_ids)] = torch.tensor(plan.token_ids)
        attention_mask[row, : len(plan.token_ids)] = 1
        for c, cycle in enumerate(plan.cycles):
            k = len(cycle.proposed)
            if k > num_slots:
                raise ValueError(f"a cycle proposed {k} tokens; replay was set for {num_slots}")
            if k and cycle.anchor < 1:
                raise ValueError(f"anchor {cycle.anchor} has no drafter entry before it")
            if cycle.stream_a_slots and cycle.anchor + cycle.stream_a_slots[-1] >= len(
                plan.token_ids
            ):
                raise ValueError(f"cycle at anchor {cycle.anchor} runs past the sequence")
            anchors[row, c] = max(cycle.anchor, 1)
            accepted[row, c] = cycle.accepted
            if k:
                proposed[row, c, :k] = torch.tensor(cycle.proposed)
                valid[row, c, :k] = True
            for slot in cycle.stream_a_slots:
                stream_a[row, c, slot - 1] = True
            for offset, slot in enumerate(cycle.stream_b_slots):
                stream_b[row, c, slot - 1] = True
                teacher[row, c, slot - 1] = cycle.teacher_logprobs[offset]
    return ReplayBatch(
        input_ids, attention_mask, anchors, proposed, valid, stream_a, stream_b, teacher, accepted
    )


def replay_forward(
    drafter: Drafter,
    features: torch.Tensor,  # [b, T, 3H] target features of input_ids
    batch: ReplayBatch,
) -> torch.Tensor:
    """Drafter logits at every recorded slot: [b, C, K, Vd] (garbage where not ``slot_valid``)."""
    return drafter.draft_from_anchors(
        features, batch.input_ids, batch.anchors, batch.num_slots, batch.proposed
    )


# -- targets, loss and the on-policy check ------------------------------------------------------


@dataclass(frozen=True)
class ReplayTargets:
    p: torch.Tensor  # [b, C, K, Vd] target distribution over the draft vocab at each slot
    labels_a: torch.Tensor  # [b, C, K] draft id of the target's token at the slot (-1 = absent)
    labels_b: torch.Tensor  # [b, C, K] draft id of the proposal at the slot (-1 = absent)


def replay_targets(
    target_logits: torch.Tensor, batch: ReplayBatch, drafter: Drafter
) -> ReplayTargets:
    """Slot k of the cycle at anchor A is predicted by the target logits at A+k-1; its token on
    the target's text is ids[A+k]."""
    b, length = batch.input_ids.shape
    slots = torch.arange(batch.num_slots, device=batch.anchors.device)
    where = (batch.anchors[:, :, None] + slots).clamp(max=length - 1)  # [b, C, K]: A+k-1
    restricted = target_logits.index_select(-1, drafter.d2t)  # [b, T, Vd]
    flat = where.reshape(b, -1)
    gathered = restricted.gather(1, flat[:, :, None].expand(-1, -1, restricted.shape[-1]))
    p = torch.softmax(gathered.float(), dim=-1).reshape(*where.shape, -1)
    tokens = batch.input_ids.gather(1, (flat + 1).clamp(max=length - 1)).reshape(where.shape)
    return ReplayTargets(p=p, labels_a=drafter.t2d[tokens], labels_b=drafter.t2d[batch.proposed])


def replay_parity(logits: torch.Tensor, batch: ReplayBatch, drafter: Drafter) -> dict:
    """Share of recorded proposals the replayed drafter reproduces by argmax, on accepted slots
    (k <= m) and on rejected slots (k > m). Meaningful for greedy/argmax-drafted rollouts made with
    the same weights: it is the proof that the replay is on-policy."""
    predicted = drafter.d2t[logits.argmax(-1)]  # [b, C, K]
    match = predicted == batch.proposed
    slots = torch.arange(1, batch.num_slots + 1, device=logits.device)
    accepted = batch.slot_valid & (slots <= batch.accepted[:, :, None])
    rejected = batch.slot_valid & ~accepted

    def share(mask: torch.Tensor) -> float | None:
        return float((match & mask).sum() / mask.sum()) if bool(mask.any()) else None

    return {
        "parity_accepted": share(accepted),
        "parity_rejected": share(rejected),
        "slots_accepted": int(accepted.sum()),
        "slots_rejected": int(rejected.sum()),
    }


def anchor_stats(
    target_logits: torch.Tensor, batch: ReplayBatch, prompt_lens: Sequence[int]
) -> dict[str, float | None]:
    """Where the replayed cycles start, for the mechanism analysis of docs/draft_opd.md: the
    anchors' mean relative position in the response (0 = first response token, 1 = last), and the
    target's top-1 probability where slot 1 is predicted (position A) against its mean over every
    response position. Anchors at positions the target itself is unsure of show up as a lower
    anchor top-1 probability."""
    length = batch.input_ids.shape[1]
    logits = target_logits.float()
    top1 = (logits.amax(-1) - logits.logsumexp(-1)).exp()  # [b, T], no [b, T, V] softmax kept
    lengths = batch.attention_mask.sum(1)
    starts = torch.tensor(list(prompt_lens), device=top1.device)
    positions = torch.arange(length, device=top1.device)
    # logits at p predict token p+1: the response is predicted from positions start-1 .. len-2
    response = (positions[None] >= starts[:, None] - 1) & (positions[None] < lengths[:, None] - 1)
    cycles = batch.slot_valid[:, :, 0]
    if not bool(cycles.any()) or not bool(response.any()):
        return {"anchor_rel_pos": None, "target_top1_anchor": None, "target_top1_response": None}
    span = (lengths - starts).clamp(min=2).float()[:, None]
    rel = ((batch.anchors - starts[:, None] + 1).float() / (span - 1)).clamp(0, 1)
    at_anchor = top1.gather(1, batch.anchors.clamp(max=length - 1))
    return {
        "anchor_rel_pos": float(rel[cycles].mean()),
        "target_top1_anchor": float(at_anchor[cycles].mean()),
        "target_top1_response": float(top1[response].mean()),
    }


def shared_target_outputs(
    plans: Sequence[SequencePlan],
    batch: ReplayBatch,
    outputs: TargetOutputs | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's right-padded features [b, T, 3H] and float32 logits [b, T, V] from a rollout's
    own text pass (``batched_greedy_rollouts(target_outputs=...)``), or None when any plan's
    text is not there. Fresh tensors, so the drafter may use them inside autograd."""
    if not outputs:
        return None
    rows = [outputs.get(p.token_ids) for p in plans]
    pairs = zip(rows, plans, strict=True)
    if any(r is None or r[0].shape[0] != len(p.token_ids) for r, p in pairs):
        return None
    b, length = batch.input_ids.shape
    device = batch.input_ids.device
    first_features, first_logits = rows[0]  # type: ignore[misc]
    features = torch.zeros((b, length, first_features.shape[-1]), device=device)
    logits = torch.zeros((b, length, first_logits.shape[-1]), device=device)
    for i, row in enumerate(rows):
        assert row is not None
        features[i, : row[0].shape[0]] = row[0]
        logits[i, : row[1].shape[0]] = row[1]
    return features, logits


def replay_loss(
    target: TargetModel,
    drafter: Drafter,
    plans: Sequence[SequencePlan],
    cfg: OPDLossConfig,
    num_slots: int,
    *,
    target_outputs: TargetOutputs | None = None,
) -> tuple[OPDLossOutput, dict[str, Any]]:
    """Features and target distributions from one no-grad target forward, the batched replay,
    and the loss (differentiable w.r.t. the drafter). Also returns timings and replay parity.

    With ``target_outputs`` holding every plan's text (the rollouts of this process wrote them),
    the target forward is skipped: those are the same features and logits (``target_shared``)."""
    t0 = time.perf_counter()
    batch = collate_plans(plans, pad_id=0, num_slots=num_slots).to(target.device)
    shared = shared_target_outputs(plans, batch, target_outputs)
    if shared is None:
        features, logits = target_features(target, batch.input_ids, batch.attention_mask)
    else:
        features, logits = shared
    targets = replay_targets(logits, batch, drafter)
    t1 = time.perf_counter()
    drafter_logits = replay_forward(drafter, features, batch)
    out = opd_loss(
        drafter_logits,
        targets.p,
        targets.labels_a,
        batch.stream_a,
        targets.labels_b,
        batch.teacher_logprobs,
        batch.stream_b,
        cfg,
    )
    info = {
        **replay_parity(drafter_logits.detach(), batch, drafter),
        **anchor_stats(logits, batch, [p.prompt_len for p in plans]),
        "norm_a": cfg.lambda_a * out.count_a,
        "norm_b": cfg.lambda_b * out.weight_b,
        "target_s": t1 - t0,
        "target_shared": shared is not None,
        "replay_s": time.perf_counter() - t1,
    }
    return out, info


__all__ = [
    "CyclePlan",
    "ReplayBatch",
    "ReplayTargets",
    "SequencePlan",
    "anchor_plan",
    "anchor_stats",
    "collate_plans",
    "random_anchor_plan",
    "replay_forward",
    "replay_loss",
    "replay_parity",
    "replay_targets",
    "shared_target_outputs",
]
