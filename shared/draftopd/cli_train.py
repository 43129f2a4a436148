"""``draftopd train``: sft (the SFT bootstrap), opd (Draft-OPD in one process), curve (a plot).

Heavy imports happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from draftopd.cli_args import (
    CommandError,
    Subparsers,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)


# flag, SFTConfig field, type, help; the defaults stay SFTConfig's (unset flags are not passed)
_SFT_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--steps", "total_steps", positive_int, "optimizer steps; LR reaches 0 here (default 2000)"),
    ("--batch-size", "batch_size", positive_int, "sequences per optimizer step (default 8)"),
    ("--lr", "lr", positive_float, "peak AdamW learning rate (default 3e-4)"),
    ("--warmup", "warmup_steps", non_negative_int, "warmup steps (default: 5%% of --steps)"),
    ("--ttt-steps", "ttt_steps", positive_int, "training-time-test unroll length (default 7)"),
    ("--draft-vocab-size", "draft_vocab_size", positive_int, "draft vocab Vd (default 32000)"),
    ("--eval-every", "eval_every", non_negative_int, "tau every N steps; 0 = end (default 100)"),
    ("--eval-draft-tokens", "eval_num_draft_tokens", positive_int, "K for tau (default 5)"),
    ("--eval-max-new-tokens", "eval_max_new_tokens", positive_int, "per tau prompt (default 64)"),
    ("--checkpoint-every", "checkpoint_every", non_negative_int, "0 = end only (default 100)"),
    ("--max-seq-len", "max_seq_len", positive_int, "prompt + response tokens (default 1024)"),
    ("--seed", "seed", non_negative_int, "init, data order, sampled regeneration (default 0)"),
)


def add_train(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("train", help="train a drafter (sft, opd) or plot a training curve")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_train_sft(stages)
    _add_train_opd(stages)
    curve = stages.add_parser("curve", help="plot held-out tau and loss from a metrics.jsonl")
    curve.add_argument("metrics", metavar="METRICS_JSONL", help="a training run's metrics.jsonl")
    curve.add_argument("--png", required=True, help="output PNG path")
    curve.add_argument(
        "--x", choices=("step", "elapsed_s"), default="step", help="x axis (default step)"
    )
    curve.set_defaults(handler=_run_train_curve_command)
    compare = stages.add_parser(
        "compare", help="plot held-out tau of several runs against steps and seconds"
    )
    compare.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=METRICS_JSONL",
        help="a run to draw (repeat the flag), e.g. --run opd=runs/opd/metrics.jsonl",
    )
    compare.add_argument("--png", required=True, help="output PNG path")
    compare.set_defaults(handler=_run_train_compare_command)
    _add_train_tau(stages)


def _add_train_tau(stages: Subparsers) -> None:
    p = stages.add_parser(
        "tau",
        help="greedy tau of every checkpoint of training runs, on MT-Bench (the bench's tau)",
        description="The target's greedy text and features are computed once; each checkpoint "
        "is scored by replaying the engine's cycles over that text. Writes RUN_DIR/"
        "tau_eval.jsonl per run (plot them with `draftopd train compare`).",
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=RUN_DIR",
        help="a training run (repeat the flag); every checkpoint in RUN_DIR/checkpoints is scored",
    )
    p.add_argument("--init", help="the checkpoint both runs started from, scored as step 0")
    p.add_argument("--prompts", help="JSONL prompt file (default: MT-Bench question.jsonl)")
    p.add_argument("--limit", type=positive_int, default=20, help="first N prompts (default 20)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="M (default 128)")
    p.add_argument("--num-draft-tokens", type=positive_int, default=4, help="K (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per target pass")
    p.add_argument("--target", default="smollm2", help="target: smollm2, a directory or a .gguf")
    p.add_argument("--json", help="also write every run's lines to this JSON file")
    _add_runtime_args(p)
    p.set_defaults(handler=_run_train_tau_command)


def _run_train_tau_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from draftopd.models.target import load_target
    from draftopd.prompts import load_prompts, render_prompt
    from draftopd.training.tau_eval import GreedyTauEvaluator, evaluate_runs

    runs = [(label, Path(path)) for label, path in _labelled(args.run, "LABEL=RUN_DIR")]
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target, device=args.device or "cpu", dtype=args.dtype)
    if target.tokenizer is None:
        raise CommandError(f"target {args.target!r} has no tokenizer")
    prompts = [render_prompt(target.tokenizer, p) for p in load_prompts(args.prompts, args.limit)]
    evaluator = GreedyTauEvaluator(
        target,
        prompts,
        num_draft_tokens=args.num_draft_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    results = evaluate_runs(evaluator, runs, init=Path(args.init) if args.init else None)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for label, lines in results.items():
        for line in lines:
            positions = " / ".join(f"{x:.2f}" for x in line["acceptance_by_position"])
            sys.stdout.write(
                f"{label}\tstep {line['step']}\t{line['elapsed_s']:.0f} s\t"
                f"tau {line['tau']:.3f}\tacceptance {positions}\n"
            )
    return 0


def _labelled(values: list[str], form: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--run {value!r}: expected {form}")
        pairs.append((label, path))
    return pairs


def _add_train_sft(stages: Subparsers) -> None:
    p = stages.add_parser(
        "sft",
        help="SFT bootstrap: regenerate data with the target, train an EAGLE-3 drafter",
        description="Prompts in, drafter checkpoint out. Reruns resume both stages; a rerun "
        "with a larger --steps extends the run.",
    )
    p.add_argument("--out", required=True, help="run directory (data/, checkpoints/, metrics)")
    p.add_argument("--target", default="smollm2", help="target: smollm2, a directory or a .gguf")
    p.add_argument("--prompts", help="training prompts JSONL (default: the built-in corpus)")
    p.add_argument("--limit", type=positive_int, help="train on the first N prompts only")
    p.add_argument(
        "--skip",
        type=non_negative_int,
        default=0,
        help="skip the first N prompts (fresh data for a continued run; default 0)",
    )
    p.add_argument(
        "--init-from", help="start from this drafter checkpoint (continued SFT) instead of random"
    )
    p.add_argument(
        "--heldout",
        type=non_negative_int,
        default=8,
        help="prompts held out (the last N of the list) for tau during training (default 8)",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=512, help="response cap (default 512)"
    )
    p.add_argument(
        "--gen-batch-size", type=positive_int, default=8, help="generate batch (default 8)"
    )
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="regeneration; 0 = greedy"
    )
    p.add_argument(
        "--top-p", type=positive_float, default=1.0, help="regeneration nucleus (default 1)"
    )
    _add_flag_table(p, _SFT_FLAGS)
    _add_runtime_args(p)
    p.set_defaults(handler=_run_train_sft_command)


def _run_train_sft_command(args: argparse.Namespace) -> int:
    from draftopd.training.configs import SFTConfig
    from draftopd.training.pipeline import SFTPipelineConfig, sft_pipeline

    config = SFTPipelineConfig(
        out_dir=args.out,
        target=args.target,
        prompts=args.prompts,
        limit=args.limit,
        skip=args.skip,
        init_from=args.init_from,
        heldout=args.heldout,
        max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.gen_batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        sft=SFTConfig(**_given(args, _SFT_FLAGS)),
        **_runtime(args),
    )
    result = sft_pipeline(config)
    return _report(result.checkpoint, result.step, result.tau)


# flag, OPDConfig field, type, help; unset flags keep OPDConfig's defaults
_OPD_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--steps", "total_steps", positive_int, "optimizer steps; LR reaches 0 here (default 200)"),
    ("--prompts-per-step", "prompts_per_step", positive_int, "rollouts per step (default 8)"),
    ("--lr", "lr", positive_float, "peak AdamW learning rate (default 3e-4)"),
    ("--num-draft-tokens", "num_draft_tokens", positive_int, "K in rollouts (default 5)"),
    ("--max-new-tokens", "max_new_tokens", positive_int, "rollout length (default 128)"),
    ("--temperature", "temperature", non_negative_float, "rollouts; 0 = greedy (default)"),
    ("--top-p", "top_p", positive_float, "rollout nucleus (default 1)"),
    ("--rollout-mode", "rollout_mode", str, "engine | batched (greedy only) (default engine)"),
    ("--rollout-batch-size", "rollout_batch_size", positive_int, "batched mode (default 8)"),
    ("--lambda-a", "lambda_a", non_negative_float, "stream A weight (default 1)"),
    ("--lambda-b", "lambda_b", non_negative_float, "stream B weight; 0 = off (default 1)"),
    ("--gamma", "gamma", positive_float, "stream B decay per slot (default 0.8)"),
    ("--stream-a-loss", "stream_a_loss", str, "soft_ce | bernoulli_fkl (default soft_ce)"),
    ("--stream-b-loss", "stream_b_loss", str, "k3 | bernoulli_fkl (default k3)"),
    ("--max-version-lag", "max_version_lag", non_negative_int, "drop older records (default 0)"),
    ("--eval-every", "eval_every", non_negative_int, "tau every N steps; 0 = end (default 25)"),
    ("--eval-draft-tokens", "eval_num_draft_tokens", positive_int, "K for tau (default 5)"),
    ("--eval-max-new-tokens", "eval_max_new_tokens", positive_int, "per tau prompt (default 64)"),
    ("--checkpoint-every", "checkpoint_every", non_negative_int, "0 = end only (default 25)"),
    ("--seed", "seed", non_negative_int, "prompt order, sampling, random anchors (default 0)"),
)


def _add_train_opd(stages: Subparsers) -> None:
    p = stages.add_parser(
        "opd",
        help="Draft-OPD: on-policy rollouts, replay from the error positions, in one process",
        description="Drafter checkpoint in, Draft-OPD checkpoint out (the Celery trainer runs "
        "the same loop). Reruns resume from the newest checkpoint.",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics)")
    p.add_argument("--drafter", required=True, help="starting checkpoint (e.g. the SFT one)")
    p.add_argument("--target", default="smollm2", help="target: smollm2, a directory or a .gguf")
    p.add_argument("--prompts", help="prompts JSONL (default: the built-in corpus)")
    p.add_argument(
        "--skip", type=non_negative_int, default=0, help="skip the first N prompts (SFT's)"
    )
    p.add_argument("--limit", type=positive_int, help="then use the next N prompts")
    p.add_argument(
        "--heldout", type=non_negative_int, default=8, help="last N prompts: tau (default 8)"
    )
    _add_flag_table(p, _OPD_FLAGS)
    p.add_argument(
        "--random-anchors",
        action="store_true",
        default=None,
        help="ablation: replay blocks at random positions",
    )
    _add_runtime_args(p)
    p.set_defaults(handler=_run_train_opd_command)


def _run_train_opd_command(args: argparse.Namespace) -> int:
    from draftopd.training.configs import OPDConfig
    from draftopd.training.opd_pipeline import OPDPipelineConfig, opd_pipeline

    config = OPDPipelineConfig(
        out_dir=args.out,
        drafter=args.drafter,
        target=args.target,
        prompts=args.prompts,
        skip=args.skip,
        limit=args.limit,
        heldout=args.heldout,
        opd=OPDConfig(**_given(args, _OPD_FLAGS, extra=("random_anchors",))),
        **_runtime(args),
    )
    result = opd_pipeline(config)
    return _report(result.checkpoint, result.step, result.tau)


def _run_train_curve_command(args: argparse.Namespace) -> int:
    from draftopd.training.pipeline import plot_training_curve

    try:
        path = plot_training_curve(args.metrics, args.png, x=args.x)
    except ImportError as err:
        raise CommandError(
            f"plotting needs matplotlib ({err}); install it with `pip install matplotlib`"
        ) from err
    logger.info("wrote %s", path)
    return 0


def _run_train_compare_command(args: argparse.Namespace) -> int:
    from draftopd.training.curves import plot_comparison

    runs = _labelled(args.run, "LABEL=METRICS_JSONL")
    try:
        out = plot_comparison(runs, args.png)
    except ImportError as err:
        raise CommandError(f"plotting needs matplotlib ({err})") from err
    logger.info("wrote %s", out)
    return 0


# -- shared by sft and opd -------------------------------------------------------------------------
FlagTable = tuple[tuple[str, str, Callable[[str], Any], str], ...]


def _add_flag_table(p: argparse.ArgumentParser, table: FlagTable) -> None:
    for flag, name, kind, text in table:
        metavar = flag[2:].upper().replace("-", "_")
        p.add_argument(flag, dest=name, type=kind, metavar=metavar, help=text)


def _given(args: argparse.Namespace, table: FlagTable, extra: tuple[str, ...] = ()) -> dict:
    """The config fields the user set (unset flags keep the config class's defaults)."""
    names = [name for _, name, _, _ in table] + list(extra)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the run in --out (default); --no-resume refuses a non-empty run",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "resume": args.resume,
        "progress": not args.no_progress,
    }


def _report(checkpoint: Any, step: int, tau: float | None) -> int:
    text = "none" if tau is None else f"{tau:.3f}"
    sys.stdout.write(f"checkpoint: {checkpoint}\nstep: {step}\ntau: {text}\n")
    return 0
