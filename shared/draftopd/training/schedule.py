"""Optimizer and learning-rate schedule: AdamW; linear warmup, then cosine decay to zero.

The schedule is a pure function of the step, so a resumed run needs no scheduler state beyond the
step counter it already saves.
"""

from __future__ import annotations

import torch

from draftopd.training.configs import warmup_cosine_lr


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
