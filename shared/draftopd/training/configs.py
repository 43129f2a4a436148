"""Training configurations, torch-free: what a train-job spec carries and the registry validates.

- ``SFTConfig``: the SFT bootstrap (EAGLE-3 recipe with training-time test);
- ``OPDConfig`` with its ``OPDLossConfig``: Draft-OPD (DRAFT_OPD.md);
- ``warmup_cosine_lr``: the learning-rate schedule both use (a pure function of the step).

Each is a frozen dataclass that validates itself and round-trips through JSON (``to_dict`` /
``from_dict``; unknown keys are an error).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from draftopd.training.config_dict import known_fields


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


def _to_json(cfg: Any) -> dict[str, Any]:
    data = asdict(cfg)
    data["betas"] = list(cfg.betas)  # JSON has no tuples
    return data


def _from_json(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    values = known_fields(cls, data)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return values


ROLLOUT_MODES = ("engine", "batched")


def check_rollout_mode(mode: str, temperature: float) -> None:
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout mode {mode!r}; allowed: {', '.join(ROLLOUT_MODES)}")
    if mode == "batched" and temperature != 0:
        raise ValueError("batched rollouts are greedy only: use temperature 0 or mode 'engine'")


STREAM_A_LOSSES = ("soft_ce", "bernoulli_fkl")
STREAM_B_LOSSES = ("k3", "bernoulli_fkl")


@dataclass(frozen=True)
class OPDLossConfig:
    lambda_a: float = 1.0
    lambda_b: float = 1.0
    gamma: float = 0.8
    stream_a_loss: str = "soft_ce"
    stream_b_loss: str = "k3"
    clip: float = 10.0
    logprob_floor: float = -10.0

    def __post_init__(self) -> None:
        if self.stream_a_loss not in STREAM_A_LOSSES:
            raise ValueError(f"stream_a_loss must be one of {STREAM_A_LOSSES}")
        if self.stream_b_loss not in STREAM_B_LOSSES:
            raise ValueError(f"stream_b_loss must be one of {STREAM_B_LOSSES}")
        if self.lambda_a < 0 or self.lambda_b < 0 or self.lambda_a + self.lambda_b == 0:
            raise ValueError("lambda_a and lambda_b must be >= 0 and not both 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.clip <= 0 or self.logprob_floor >= 0:
            raise ValueError("clip must be > 0 and logprob_floor < 0")


@dataclass(frozen=True)
class SFTConfig:
    lr: float = 3e-4  # peak AdamW learning rate
    warmup_fraction: float = 0.05  # share of total_steps in linear warmup (if warmup_steps unset)
    warmup_steps: int | None = None  # explicit warmup length; overrides warmup_fraction
    total_steps: int = 2000  # optimizer steps; the cosine reaches zero here
    batch_size: int = 8  # sequences per optimizer step
    max_seq_len: int = 1024  # prompt + response tokens kept per sequence (cut on the right)
    ttt_steps: int = 7  # training-time-test unroll length S
    step_decay: float = 0.8  # loss weight of unroll step j is step_decay ** j
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (norms exempt)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    draft_vocab_size: int = 32000  # Vd, the most frequent response tokens (capped at V)
    eval_every: int = 100  # held-out tau every N steps, at step 0 and at the end; 0 = only end
    eval_num_draft_tokens: int = 5  # K drafts per cycle when measuring held-out tau
    eval_max_new_tokens: int = 64  # tokens generated per held-out prompt
    checkpoint_every: int = 100  # resumable checkpoint every N steps (and at the end); 0 = end
    seed: int = 0  # drafter initialisation and data order

    def __post_init__(self) -> None:
        positive = ("total_steps", "batch_size", "max_seq_len", "ttt_steps", "draft_vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 < self.step_decay <= 1 or not 0 <= self.warmup_fraction <= 1:
            raise ValueError(
                f"need lr > 0, step_decay in (0, 1], warmup_fraction in [0, 1]; got "
                f"{self.lr}, {self.step_decay}, {self.warmup_fraction}"
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}]")

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * self.total_steps)

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step, peak_lr=self.lr, warmup_steps=self.warmup, total_steps=self.total_steps
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SFTConfig:
        return cls(**_from_json(cls, data))


@dataclass(frozen=True)
class OPDConfig:
    lr: float = 3e-4  # peak AdamW learning rate (the paper's)
    warmup_fraction: float = 0.05
    total_steps: int = 200  # optimizer steps; the cosine reaches zero here
    prompts_per_step: int = 8  # rollout sequences per optimizer step (the paper: ~200 on GPUs)
    num_draft_tokens: int = 5  # K during rollouts
    max_new_tokens: int = 128  # rollout length
    temperature: float = 0.0  # rollouts: 0 = greedy (the paper's default)
    top_p: float = 1.0
    rollout_mode: str = "engine"  # "engine" (one sequence at a time) or "batched" (greedy only)
    rollout_batch_size: int = 8  # sequences per batched rollout pass
    lambda_a: float = 1.0
    lambda_b: float = 1.0
    gamma: float = 0.8
    stream_a_loss: str = "soft_ce"
    stream_b_loss: str = "k3"
    random_anchors: bool = False  # ablation: same number of blocks at random positions
    max_version_lag: int = 0  # records made by older drafter versions are dropped
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 25  # held-out tau every N steps (and at step 0 and the end); 0 = end
    eval_num_draft_tokens: int = 5
    eval_max_new_tokens: int = 64
    checkpoint_every: int = 25
    seed: int = 0  # prompt order, sampled rollouts, random anchors

    def __post_init__(self) -> None:
        for name in ("total_steps", "prompts_per_step", "num_draft_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "max_version_lag", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need lr > 0, temperature >= 0 and top_p in (0, 1]")
        check_rollout_mode(self.rollout_mode, self.temperature)
        if self.rollout_batch_size < 1:
            raise ValueError(f"rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        _ = self.loss_config  # validates the loss fields

    @property
    def loss_config(self) -> OPDLossConfig:
        return OPDLossConfig(
            lambda_a=self.lambda_a,
            lambda_b=self.lambda_b,
            gamma=self.gamma,
            stream_a_loss=self.stream_a_loss,
            stream_b_loss=self.stream_b_loss,
        )

    def lr_at(self, step: int) -> float:
        warmup = round(self.warmup_fraction * self.total_steps)
        return warmup_cosine_lr(
            step, peak_lr=self.lr, warmup_steps=warmup, total_steps=self.total_steps
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OPDConfig:
        return cls(**_from_json(cls, data))


__all__ = [
    "ROLLOUT_MODES",
    "STREAM_A_LOSSES",
    "STREAM_B_LOSSES",
    "OPDConfig",
    "OPDLossConfig",
    "SFTConfig",
    "check_rollout_mode",
    "warmup_cosine_lr",
]
