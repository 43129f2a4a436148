"""Training configurations, torch-free. Each setting is declared once, here.

- ``RunConfig``: the run section (where the run lives, which target and prompts, the device);
- ``SFTConfig``: the SFT stage (target regeneration, then the family's SFT objective);
- ``OPDConfig`` with its nested ``OPDLossConfig``: Draft-OPD (docs/draft_opd.md).

A train-job spec (``wire/job_specs.py``) is a run section plus an ``sft`` or ``opd`` section made
of exactly these classes, the pipelines take those sections as they are, and the ``draftopd
train`` flags are generated from the fields (``cli/config_flags.py``): the help text of a flag is
the ``help`` of its field, its default the field's default.

Each class is a frozen dataclass that validates itself in ``__post_init__`` (ValueError naming
the field) and round-trips through JSON (``to_dict`` / ``from_dict``; unknown keys are an error).
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import ConfigDict, Strict
from pydantic import Field as Limits

from draftopd.config_fields import setting
from draftopd.training.data.corpus import DEFAULT_MIN_PROMPTS
from draftopd.wire.formats import DEFAULT_TARGET

DTYPES = ("float32", "bfloat16", "float16")
ROLLOUT_MODES = ("engine", "batched")
STREAM_A_LOSSES = ("soft_ce", "bernoulli_fkl")
STREAM_B_LOSSES = ("k3", "bernoulli_fkl")
FEATURE_CACHES = ("off", "float32", "bfloat16", "float16")
DRAFTER_TYPES = ("eagle3", "dflash")
AUTOCASTS = ("off", "bfloat16", "auto")
SFT_TARGETS = ("soft", "hard")  # what the SFT cross-entropy is taken against
EVAL_MODES = ("cached", "engine")

MAX_INT = 2**31 - 1  # integers travel through 32-bit database columns
# What a job spec may carry (pydantic validates these classes at the registry): unknown keys,
# NaN and infinities are errors, integers are integers (no "5", 2.5, 2.0 or true) within MAX_INT,
# and text fields are bounded.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
Int = Annotated[int, Strict(), Limits(ge=-MAX_INT, le=MAX_INT)]
Text = Annotated[str, Limits(max_length=4096)]


def warmup_cosine_lr(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    """Learning rate of the update that follows ``step`` completed optimizer steps.

    Warmup climbs linearly to ``peak_lr`` over the first ``warmup_steps`` updates (the first
    update already uses peak_lr / warmup_steps); the rest follows a half cosine from ``peak_lr``
    to ``min_lr_ratio * peak_lr`` at ``decay_steps`` (default ``total_steps``) and holds that
    floor until ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    end = total_steps if decay_steps is None else decay_steps
    if not 0 <= warmup_steps <= end <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= decay_steps <= total_steps, got {warmup_steps}, "
            f"{end}, {total_steps}"
        )
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(end - warmup_steps, 1), 1.0)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_rollout_mode(mode: str, temperature: float) -> None:
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout mode {mode!r}; allowed: {', '.join(ROLLOUT_MODES)}")
    if mode == "batched" and temperature != 0:
        raise ValueError("batched rollouts are greedy only: use temperature 0 or mode 'engine'")


def _at_least(cfg: Any, minimum: float, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum:g}, got {value}")


def _finite(cfg: Any) -> None:
    """Every float of a config is finite (NaN or an infinity is a ValueError naming it)."""
    for item in fields(cfg):
        value = getattr(cfg, item.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{item.name} must be a finite number, got {value}")


def _one_of(value: str, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


C = TypeVar("C", bound="_JSONConfig")


class _JSONConfig:
    """JSON round trip shared by the config classes (tuples become lists)."""

    __pydantic_config__: ClassVar[ConfigDict] = _STRICT

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        values = cls.normalise(dict(data))
        unknown = set(values) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def normalise(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Earlier layouts of the section mapped to this one (none by default)."""
        return data

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        return frozenset(
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.metadata.get("resumable")
        )


def config_fields(cls: type) -> list[Field[Any]]:
    """The fields of a config class (for the CLI)."""
    return list(fields(cls))


@dataclass(frozen=True)
class RunConfig(_JSONConfig):
    """The run section: where the run lives, what it trains on, where it computes."""

    out_dir: Text = setting(help="run directory: data/, checkpoints/, metrics.jsonl", flag="--out")
    target: Text = setting(DEFAULT_TARGET, "target: smollm2, a directory or a .gguf")
    prompts: Text | None = setting(None, "training prompts JSONL; none = the built-in corpus")
    skip: Int = setting(0, "skip the first N non-held-out prompts (fresh data for a next stage)")
    limit: Int | None = setting(None, "then use the next N prompts; none = all the rest")
    heldout: Int = setting(8, "the last N prompts of the list, never trained on: tau in training")
    corpus_seed: Int = setting(0, "seed of the built-in corpus (ignored with --prompts)")
    corpus_size: Int = setting(
        DEFAULT_MIN_PROMPTS, "prompts in the built-in corpus (ignored with --prompts)"
    )
    self_prompts: Int = setting(
        0,
        "first have the target write N prompts itself (self-instruct, <out>/self_prompts.jsonl, "
        "resumable) and interleave them with the training prompts; 0 = none",
    )
    self_prompts_dtype: Text | None = setting(
        None,
        "target dtype for sampling the --self-prompts (their answers and features still come "
        "from --dtype); none = --dtype",
        choices=DTYPES,
    )
    device: Text | None = setting(None, "torch device; none = cuda when available, else cpu")
    dtype: Text = setting("float32", "target dtype", choices=DTYPES)
    threads: Int | None = setting(None, "torch intra-op CPU threads; none = torch's default")

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        _at_least(self, 0, ("skip", "heldout", "self_prompts"))
        _at_least(self, 1, ("limit", "threads", "corpus_size"))
        _one_of(self.dtype, "dtype", DTYPES)
        if self.self_prompts_dtype is not None:
            _one_of(self.self_prompts_dtype, "self_prompts_dtype", DTYPES)


def _total_steps(default: int) -> Any:
    return setting(default, "optimizer steps (the run's length)", flag="--steps")


def _eval_every(default: int) -> Any:
    return setting(default, "held-out tau every N steps (and 0, end); 0 = end", resumable=True)


def _checkpoint_every(default: int) -> Any:
    return setting(default, "checkpoint every N steps (and end); 0 = end", resumable=True)


@dataclass(frozen=True)
class LoopConfig(_JSONConfig):
    """The optimisation, evaluation and checkpoint settings SFT and Draft-OPD share. A stage
    gives ``total_steps``, ``eval_every`` and ``checkpoint_every`` its own defaults through
    ``_total_steps`` / ``_eval_every`` / ``_checkpoint_every`` (one help text each)."""

    lr: float = setting(3e-4, "peak AdamW learning rate")
    min_lr_ratio: float = setting(0.0, "the cosine decays to this fraction of the peak LR")
    warmup_fraction: float = setting(0.05, "share of the steps in linear warmup (if no --warmup)")
    warmup_steps: Int | None = setting(
        None, "warmup steps; overrides the fraction", flag="--warmup"
    )
    total_steps: Int = _total_steps(2000)
    decay_steps: Int | None = setting(
        None, "the cosine reaches the floor at this step and holds it to --steps; none = --steps"
    )
    max_seconds: float | None = setting(
        None,
        "also stop once the optimizer seconds reach this (comparisons at equal time); "
        "the LR schedule still follows --steps",
        resumable=True,
    )
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay on matrices")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW moment decay rates", cli=False)
    eval_every: Int = _eval_every(100)
    eval_num_draft_tokens: Int = setting(
        5, "K drafts per cycle for held-out tau", flag="--eval-draft-tokens", resumable=True
    )
    eval_max_new_tokens: Int = setting(64, "tokens per held-out tau prompt", resumable=True)
    eval_mode: Text = setting(
        "cached",
        "held-out tau: cached (the target's greedy text and features once, one drafter pass per "
        "eval; equal to the engine's tau up to near-ties) or engine (real decoding)",
        choices=EVAL_MODES,
        resumable=True,
    )
    checkpoint_every: Int = _checkpoint_every(100)

    def __post_init__(self) -> None:
        _finite(self)
        _at_least(self, 1, ("total_steps", "eval_num_draft_tokens", "eval_max_new_tokens"))
        _at_least(self, 0, ("eval_every", "checkpoint_every", "weight_decay", "grad_clip"))
        _one_of(self.eval_mode, "eval_mode", EVAL_MODES)
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if not 0 <= self.min_lr_ratio < 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1), got {self.min_lr_ratio}")
        if self.lr <= 0 or not 0 <= self.warmup_fraction <= 1:
            raise ValueError(
                f"need lr > 0 and warmup_fraction in [0, 1]; got {self.lr}, {self.warmup_fraction}"
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}]")
        if self.decay_steps is not None and not self.warmup <= self.decay_steps <= self.total_steps:
            raise ValueError(
                f"decay_steps must be in [{self.warmup}, {self.total_steps}] (warmup to --steps), "
                f"got {self.decay_steps}"
            )

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * self.total_steps)

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step,
            peak_lr=self.lr,
            warmup_steps=self.warmup,
            total_steps=self.total_steps,
            min_lr_ratio=self.min_lr_ratio,
            decay_steps=self.decay_steps,
        )


@dataclass(frozen=True)
class SFTConfig(LoopConfig):
    """The SFT stage: the target answers the training prompts, the drafter learns from them."""

    # -- data: target regeneration
    init_from: Text | None = setting(
        None, "start a fresh run from this drafter checkpoint (continued SFT)", resumable=True
    )
    max_new_tokens: Int = setting(512, "cap on each target-written response", resumable=True)
    gen_batch_size: Int = setting(
        64, "sequences generated together (lean: continuous-batching slots)", resumable=True
    )
    gen_engine: Text = setting(
        "auto",
        "data generation: lean (greedy, continuous batching), generate (HF), or auto",
        choices=("auto", "lean", "generate"),
        resumable=True,
    )
    temperature: float = setting(0.0, "regeneration temperature; 0 = greedy", resumable=True)
    top_p: float = setting(1.0, "regeneration nucleus cut-off", resumable=True)
    # -- training
    batch_size: Int = setting(8, "sequences per optimizer step")
    max_seq_len: Int = setting(1024, "prompt + response tokens kept per sequence (cut right)")
    ttt_steps: Int = setting(
        4, "training-time-test unroll length (draft slots trained); default = serving K"
    )
    step_decay: float = setting(0.8, "loss weight of unroll step j is step_decay ** j")
    sft_target: Text = setting(
        "soft",
        "soft: cross-entropy to the target's distribution over the draft vocab; hard: to its top "
        "token there (on greedy data, the data's own token when the draft vocab has it)",
        choices=SFT_TARGETS,
    )
    draft_vocab_size: Int = setting(8000, "draft vocab Vd: the most frequent response tokens")
    drafter_type: Text = setting(
        "eagle3", "family of a fresh drafter (init_from keeps its own)", choices=DRAFTER_TYPES
    )
    block_size: Int = setting(8, "dflash: block size B (the anchor + B-1 drafted slots)")
    drafter_layers: Int = setting(1, "dflash: decoder layers")
    block_anchors: Int = setting(
        0, "dflash: block SFT on this many random response anchors per sequence and step; 0 = all"
    )
    init_from_target: bool = setting(
        False, "fresh drafter: LM head rows and final norm copied from the target"
    )
    autocast: Text = setting(
        "off",
        "drafter forward/backward under torch.autocast at this dtype (weights and optimizer "
        "stay float32); bfloat16 is about 1.5x faster on CPUs with AVX512-BF16 or AMX and about "
        "2.7x slower on CPUs without them; auto = bfloat16 where the device has native bf16 "
        "arithmetic, else off",
        choices=AUTOCASTS,
    )
    feature_cache: Text = setting(
        "off",
        "target features cached once per sample at this dtype (training never runs the target), "
        "or off (a target forward every step)",
        choices=FEATURE_CACHES,
    )
    seed: Int = setting(0, "drafter init, data order, sampled regeneration")
    time_budget: float | None = setting(
        None,
        "minutes for the whole run from its first launch, data included: after the data stage "
        "it times its steps here and sets --steps, --decay-steps (3/4), --eval-every and "
        "--checkpoint-every (1/8) to fill the rest (saved in <out>/budget.json)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 minutes, got {self.time_budget}")
        _one_of(self.feature_cache, "feature_cache", FEATURE_CACHES)
        _one_of(self.drafter_type, "drafter_type", DRAFTER_TYPES)
        _one_of(self.autocast, "autocast", AUTOCASTS)
        _one_of(self.sft_target, "sft_target", SFT_TARGETS)
        _at_least(self, 1, ("drafter_layers",))
        _at_least(self, 0, ("block_anchors",))
        _at_least(self, 2, ("block_size",))
        _at_least(self, 1, ("batch_size", "max_seq_len", "ttt_steps", "draft_vocab_size"))
        _at_least(self, 1, ("max_new_tokens", "gen_batch_size"))
        if not 0 < self.step_decay <= 1:
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}"
            )


@dataclass(frozen=True)
class OPDLossConfig(_JSONConfig):
    """The two-stream Draft-OPD loss (docs/draft_opd.md, "Replay and loss")."""

    lambda_a: float = setting(1.0, "stream A weight (accepted and correction slots)")
    lambda_b: float = setting(1.0, "stream B weight (rejected slots); 0 = off")
    gamma: float = setting(0.8, "stream B weight decay per slot: gamma ** (k-1)")
    stream_a_loss: Text = setting("soft_ce", "stream A loss", choices=STREAM_A_LOSSES)
    stream_b_loss: Text = setting("k3", "stream B loss", choices=STREAM_B_LOSSES)
    clip: float = setting(10.0, "clip each token's loss to [-clip, clip]")
    logprob_floor: float = setting(-10.0, "floor on log-probs inside the loss")

    def __post_init__(self) -> None:
        _finite(self)
        _one_of(self.stream_a_loss, "stream_a_loss", STREAM_A_LOSSES)
        _one_of(self.stream_b_loss, "stream_b_loss", STREAM_B_LOSSES)
        if self.lambda_a < 0 or self.lambda_b < 0 or self.lambda_a + self.lambda_b == 0:
            raise ValueError("lambda_a and lambda_b must be >= 0 and not both 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.clip <= 0 or self.logprob_floor >= 0:
            raise ValueError("clip must be > 0 and logprob_floor < 0")


@dataclass(frozen=True)
class OPDConfig(LoopConfig):
    """Draft-OPD: on-policy rollouts, replay from the error positions, one step, repeat."""

    drafter: Text = setting("", "starting drafter checkpoint (e.g. the SFT one)", resumable=True)
    # -- rollouts
    prompts_per_step: Int = setting(8, "rollout sequences per optimizer step (paper: ~200)")
    num_draft_tokens: Int = setting(5, "K drafts per cycle in rollouts")
    max_new_tokens: Int = setting(128, "rollout length")
    temperature: float = setting(0.0, "rollout temperature; 0 = greedy (the paper's default)")
    top_p: float = setting(1.0, "rollout nucleus cut-off")
    rollout_mode: Text = setting(
        "engine", "engine, or batched (greedy only)", choices=ROLLOUT_MODES
    )
    rollout_batch_size: Int = setting(8, "sequences per batched rollout pass")
    max_version_lag: Int = setting(0, "records made by older drafter versions are dropped")
    requests_per_step: Int = setting(
        2, "trainer service: rollout requests per step", cli=False, resumable=True
    )
    rollout_timeout_s: float = setting(
        600.0, "trainer service: seconds to wait for a step's rollouts", cli=False, resumable=True
    )
    # -- the loss
    loss: OPDLossConfig = field(default_factory=OPDLossConfig)
    random_anchors: bool = setting(False, "ablation: the same number of blocks at random anchors")
    seed: Int = setting(0, "prompt order, sampled rollouts, random anchors")
    # -- the stage's own schedule defaults
    total_steps: Int = _total_steps(200)
    eval_every: Int = _eval_every(25)
    checkpoint_every: Int = _checkpoint_every(25)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # pydantic and from_dict hand the nested section as-is
            object.__setattr__(self, "loss", OPDLossConfig.from_dict(self.loss))
        super().__post_init__()
        _at_least(self, 1, ("prompts_per_step", "num_draft_tokens", "max_new_tokens"))
        _at_least(self, 1, ("rollout_batch_size", "requests_per_step"))
        _at_least(self, 0, ("max_version_lag",))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not self.rollout_timeout_s > 0:
            raise ValueError("need temperature >= 0, top_p in (0, 1] and rollout_timeout_s > 0")
        check_rollout_mode(self.rollout_mode, self.temperature)

    @classmethod
    def normalise(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Earlier releases kept the loss fields flat beside the others: nest them."""
        loss_names = {f.name for f in fields(OPDLossConfig)}
        flat = {k: data.pop(k) for k in list(data) if k in loss_names}
        if flat:
            data["loss"] = {**dict(data.get("loss") or {}), **flat}
        return data


__all__ = [
    "AUTOCASTS",
    "DRAFTER_TYPES",
    "DTYPES",
    "EVAL_MODES",
    "FEATURE_CACHES",
    "ROLLOUT_MODES",
    "STREAM_A_LOSSES",
    "STREAM_B_LOSSES",
    "LoopConfig",
    "OPDConfig",
    "OPDLossConfig",
    "RunConfig",
    "SFTConfig",
    "check_rollout_mode",
    "config_fields",
    "setting",
    "warmup_cosine_lr",
]
