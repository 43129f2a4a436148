"""Optimizer and learning-rate schedule: AdamW; linear warmup, then cosine decay to zero.

The schedule is a pure function of the step, so a resumed run needs no scheduler state beyond the
step counter it already saves.
"""

from __future__ import annotations

import time

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


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    timings: dict[str, float] | None = None,
) -> float:
    """Backward, global gradient clipping (0 = none), then one step at ``lr``; the grad norm.
    ``timings`` gets ``backward_s`` and ``step_s``."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t1 = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if timings is not None:
        timings.update(backward_s=t1 - t0, step_s=time.perf_counter() - t1)
    return float(norm)


__all__ = ["make_adamw", "optimizer_step", "warmup_cosine_lr"]
