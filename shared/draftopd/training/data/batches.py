"""Training batches: which samples a step uses, right-padded batches, and the target's features.

Shared by SFT and the Draft-OPD replay. Data order is a pure function of the step
(``batch_indices``), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from draftopd.models.target import TargetModel
from draftopd.training.data.regenerate import Sample


def batch_indices(step: int, *, num_samples: int, batch_size: int, seed: int) -> list[int]:
    """Sample indices of the batch at ``step``: consecutive slices of per-epoch permutations."""
    indices = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(k, num_samples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(num_samples, generator=generator)[offset]))
    return indices


@dataclass(frozen=True)
class Batch:
    """Right-padded training batch: prompt followed by response, then ``pad_id``."""

    input_ids: torch.Tensor  # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long, 1 on real tokens
    loss_mask: torch.Tensor  # [batch, seq] bool, True where input_ids[b, t] is a response token

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
        )


class TargetFeatures(NamedTuple):
    """One target forward over a training batch (unpacks as ``features, logits``)."""

    features: torch.Tensor  # [batch, seq, 3 * hidden] low/mid/high layers, the target's dtype
    logits: torch.Tensor  # [batch, seq, vocab] float32


def collate(samples: Sequence[Sample], pad_id: int, *, max_length: int | None = None) -> Batch:
    """Right-pad ``prompt_ids + response_ids`` of each sample into one batch.

    ``max_length`` truncates long sequences from the right (the prompt start is kept).
    ``loss_mask`` marks the positions that *hold* response tokens: a next-token loss whose
    prediction at position t targets ``input_ids[:, t + 1]`` uses ``loss_mask[:, 1:]``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    sequences = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    if max_length is not None:
        sequences = [seq[:max_length] for seq in sequences]
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, (sample, seq) in enumerate(zip(samples, sequences, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        loss_mask[row, len(sample.prompt_ids) : len(seq)] = True
    return Batch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


def target_features(
    target: TargetModel,
    batch_ids: torch.Tensor,  # [batch, seq] right-padded
    attention_mask: torch.Tensor,  # [batch, seq] 1 on real tokens, a prefix of each row
) -> TargetFeatures:
    """One no-grad target forward over a right-padded batch: fused features and logits.

    With right padding every real token keeps positions 0..n-1 and attends only to real tokens
    before it, so its outputs equal an unpadded forward of that sequence alone; outputs at padded
    positions are meaningless. ``no_grad`` (not ``inference_mode``) so the drafter may use the
    results inside autograd.
    """
    out = target_pass(target, batch_ids, attention_mask)
    return TargetFeatures(features=out.features, logits=out.logits)


@dataclass(frozen=True)
class TargetPass:
    """:func:`target_pass`: what the feature cache stores, plus the logits to check it."""

    features: torch.Tensor  # [batch, seq, 3 * hidden] low/mid/high layers
    logits: torch.Tensor  # [batch, seq, vocab] float32
    hidden: torch.Tensor  # [batch, seq, hidden] final hidden state (after the final norm)


def target_pass(
    target: TargetModel, batch_ids: torch.Tensor, attention_mask: torch.Tensor
) -> TargetPass:
    """:func:`target_features` plus the final hidden state the LM head reads."""
    if batch_ids.shape != attention_mask.shape or batch_ids.dim() != 2:
        raise ValueError(
            f"batch_ids {tuple(batch_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [batch, seq]"
        )
    mask = attention_mask.long()
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded (ones, then zeros, in every row)")
    device = target.device
    with torch.no_grad():
        out = target.model(
            input_ids=batch_ids.to(device),
            attention_mask=mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
    # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output, and the
    # last one is after the final norm (what the LM head reads).
    features = torch.cat([out.hidden_states[i + 1] for i in target.feature_layers], dim=-1)
    return TargetPass(features=features, logits=out.logits.float(), hidden=out.hidden_states[-1])


__all__ = [
    "Batch",
    "TargetFeatures",
    "TargetPass",
    "batch_indices",
    "collate",
    "target_features",
    "target_pass",
]
