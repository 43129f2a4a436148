"""Optimizer and learning-rate schedule: AdamW; linear warmup, then cosine decay to zero.

The schedule is a pure function of the step, so a resumed run needs no scheduler state beyond the
step counter it already saves.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of the update that follows ``step`` completed optimizer steps.

    Warmup climbs linearly to ``peak_lr`` over the first ``warmup_steps`` updates (the first
    update already uses peak_lr / warmup_steps); the rest follows a half cosine to zero at
    ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_adamw(
    model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (norm weights are exempt)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


__all__ = ["make_adamw", "warmup_cosine_lr"]
