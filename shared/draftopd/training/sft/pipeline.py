"""SFT pipeline: training prompts in, a drafter checkpoint out (``draftopd train sft``).

One call of :func:`sft_pipeline` runs the whole SFT bootstrap (docs/draft_opd.md, "SFT
bootstrap") from a run section and an SFT section (``training/configs.py``), as a train-job spec
carries them:

1. load the target;
2. load the training prompts (the built-in offline corpus, or the user's JSONL) and split off the
   held-out prompts (``split_prompts``: the *last* ``heldout`` prompts, never trained on, used
   for tau during training);
3. have the target answer the training prompts (``regenerate`` into ``<out_dir>/data``);
4. with ``time_budget``, size the training to what is left of the budget
   (``training/budget.py``);
5. train the drafter (``train_sft`` into ``<out_dir>``).

Both stages resume: a rerun generates only the prompts not yet answered and trains on from the
newest checkpoint; a rerun with a larger ``total_steps`` extends the run. ``<out_dir>/run.json``
records the sections of the latest call and the held-out prompt ids. The ``draftopd train sft``
command and the trainer service's Celery task both call :func:`sft_pipeline`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from draftopd.models.checkpoint import load_drafter
from draftopd.models.target import TargetModel
from draftopd.prompts import Prompt
from draftopd.training.budget import StepTiming, budget_plan, start_clock
from draftopd.training.configs import RunConfig, SFTConfig
from draftopd.training.data.features import FeatureSpec, build_feature_cache
from draftopd.training.data.regenerate import MANIFEST, RegenStats, regenerate
from draftopd.training.run import latest_checkpoint
from draftopd.training.setup import prepare_run
from draftopd.training.sft.train import load_samples, time_sft, train_sft, vocab_coverage

logger = logging.getLogger(__name__)

DATA_DIR = "data"
FEATURES_DIR = "features"
COVERAGE_SIZES = (2000, 4000, 8000, 16000, 32000)
TIMED_STEPS = 20  # optimizer steps timed for a --time-budget plan (batches vary in length)


@dataclass(frozen=True)
class SFTPipelineResult:
    checkpoint: Path  # the final checkpoint directory (loadable with ``load_drafter``)
    step: int  # optimizer steps completed
    tau: float | None  # held-out tau of the final drafter (None without held-out prompts)
    metrics_path: Path  # the training metrics JSONL
    data_dir: Path  # the regenerated samples
    regen: RegenStats  # what this call generated (zero prompts when the data was complete)
    resumed_from: int  # the training step this call started from (0 = fresh)
    num_train_prompts: int  # prompts the drafter is trained on
    heldout_ids: tuple[str, ...]  # ids of the held-out prompts


def sft_pipeline(
    run: RunConfig,
    sft: SFTConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    on_shard: Callable[[Path], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> SFTPipelineResult:
    """Regenerate SFT data with the target and train a drafter on it; resumable.

    ``resume=False`` refuses a run directory that already holds data or checkpoints. ``on_shard``
    (each committed data shard) and ``on_step`` (each training step's metrics line) report
    progress; an exception raised in either stops the run, and a rerun resumes it.
    """
    out = Path(run.out_dir)
    if not resume:
        _check_fresh(out)
    if sft.time_budget is not None:
        start_clock(out, sft.time_budget, fresh=not resume)
    setup = prepare_run(run, kind="sft", stage=sft.to_dict())
    target = setup.target
    with logging_redirect_tqdm():
        spec = None
        if sft.feature_cache != "off":
            spec = FeatureSpec(out / FEATURES_DIR, sft.feature_cache, sft.max_seq_len)
        regen = _regenerate(
            target, setup.split.train, out / DATA_DIR, sft, progress, on_shard, spec
        )
        features = _feature_cache(target, out, spec, progress)
        evaluator: list[Any] = []  # the timing's held-out evaluator, for the run to reuse
        if sft.time_budget is not None:

            def time_it(cfg: SFTConfig) -> StepTiming:
                timing, built = time_sft(
                    target, out / DATA_DIR, cfg, features=features,
                    eval_prompts=setup.eval_prompts, steps=TIMED_STEPS,
                )  # fmt: skip
                evaluator.append(built)
                return timing

            sft = budget_plan(out, sft, time_it)
        result = train_sft(
            target,
            out / DATA_DIR,
            out,
            sft,
            drafter=None if sft.init_from is None else load_drafter(sft.init_from, target),
            resume=resume,
            progress=progress,
            eval_prompts=setup.eval_prompts,
            on_step=on_step,
            features=features,
            evaluator=evaluator[0] if evaluator else None,
        )
    _log_final(result.checkpoint, result.step, result.tau)
    return SFTPipelineResult(
        checkpoint=result.checkpoint,
        step=result.step,
        tau=result.tau,
        metrics_path=result.metrics_path,
        data_dir=out / DATA_DIR,
        regen=regen,
        resumed_from=result.resumed_from,
        num_train_prompts=len(setup.split.train),
        heldout_ids=setup.heldout_ids,
    )


def _regenerate(
    target: TargetModel,
    prompts: list[Prompt],
    data_dir: Path,
    sft: SFTConfig,
    progress: bool,
    on_shard: Callable[[Path], None] | None,
    features: FeatureSpec | None,
) -> RegenStats:
    return regenerate(
        target,
        prompts,
        data_dir,
        max_new_tokens=sft.max_new_tokens,
        batch_size=sft.gen_batch_size,
        temperature=sft.temperature,
        top_p=sft.top_p,
        seed=sft.seed,  # sampled regeneration only
        progress=progress,
        on_shard=on_shard,
        features=features,
        engine=sft.gen_engine,
    )


def _feature_cache(
    target: TargetModel, out: Path, spec: FeatureSpec | None, progress: bool
) -> Path | None:
    """Report the draft-vocab coverage; complete the feature cache when it is on (greedy
    regeneration already wrote the features of the shards it generated)."""
    samples = load_samples(out / DATA_DIR)
    coverage = vocab_coverage(samples, COVERAGE_SIZES)
    logger.info(
        "draft vocab coverage of the %d response tokens: %s",
        sum(len(s.response_ids) for s in samples),
        ", ".join(f"{size}: {share:.4f}" for size, share in coverage.items()),
    )
    if spec is None:
        return None
    stats = build_feature_cache(target, out / DATA_DIR, spec, progress=progress)
    if stats.samples:
        logger.info(
            "feature cache: %d samples, %d tokens in %.0f s (%d bytes per token)",
            stats.samples, stats.tokens, stats.seconds, stats.bytes_per_token,
        )  # fmt: skip
    return spec.out_dir


def _check_fresh(out: Path) -> None:
    """With resume off, refuse a directory that already holds data or checkpoints."""
    if (out / DATA_DIR / MANIFEST).is_file() or latest_checkpoint(out) is not None:
        raise ValueError(
            f"{out} already holds an SFT run; resume it (drop --no-resume) or use a new out_dir"
        )


def _log_final(checkpoint: Path, step: int, tau: float | None) -> None:
    text = "n/a (no held-out prompts)" if tau is None else f"{tau:.3f}"
    logger.info("final checkpoint: %s (step %d); held-out tau %s", checkpoint, step, text)


__all__ = ["SFTPipelineResult", "sft_pipeline"]
