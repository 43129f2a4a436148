"""``draftopd train``: sft (the SFT bootstrap), opd (Draft-OPD in one process), curve (a plot).

Heavy imports happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftopd.cli.args import (
    CommandError,
    Subparsers,
    add_config_flags,
    config_from_args,
    positive_int,
)
from draftopd.training.configs import OPDConfig, RunConfig, SFTConfig

logger = logging.getLogger(__name__)


def add_train(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("train", help="train a drafter (sft, opd) or plot a training curve")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in _STAGES:
        _add_stage(stages, stage)
    curve = stages.add_parser(
        "curve",
        help="plot held-out tau, loss and top-1 agreement per TTT step against steps and seconds; "
        "print whether the run ended at a plateau",
    )
    curve.add_argument("metrics", metavar="METRICS_JSONL", help="a training run's metrics.jsonl")
    curve.add_argument("--png", help="output PNG path (none = only the plateau verdict)")
    curve.add_argument(
        "--smooth", type=positive_int, default=20, help="moving average of losses (default 20)"
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
        help="a run to draw (repeat the flag), e.g. --run opd=runs/opd/metrics.jsonl; runs "
        "with the same label are seeds of one arm (mean and 95%% CI band)",
    )
    compare.add_argument(
        "--base",
        metavar="LABEL=METRICS_JSONL",
        help="the run the arms branched from, drawn before the branch point (step 0)",
    )
    compare.add_argument("--title", help="figure title")
    compare.add_argument("--png", required=True, help="output PNG path")
    compare.set_defaults(handler=_run_train_compare_command)
    _add_train_tau(stages)
    _add_train_prompts(stages)


def _add_train_prompts(stages: Subparsers) -> None:
    p = stages.add_parser(
        "prompts",
        help="training prompts written by the target itself (self-instruct), for --prompts",
        description="Samples user requests from the target given only the start of a user turn "
        "(its chat template), keeps new ones clear of MT-Bench, and appends them to OUT as JSONL "
        "(resumable: a rerun continues). docs/training.md.",
    )
    p.add_argument("--out", required=True, help="JSONL file to write (appended to on resume)")
    p.add_argument("--count", type=positive_int, required=True, help="prompts wanted in OUT")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per target pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=96,
                   help="longest request; longer ones are dropped (default 96)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="(default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="(default 0.95)")
    add_config_flags(p, RunConfig, title="target", only=("target", "device", "dtype", "threads"))
    p.set_defaults(handler=_run_train_prompts_command)


def _run_train_prompts_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from draftopd.models.target import load_target
    from draftopd.training.data.self_instruct import self_instruct

    where = config_from_args(args, RunConfig, out_dir=".")
    if where.threads:
        torch.set_num_threads(where.threads)
    target = load_target(where.target, device=where.device or "cpu", dtype=where.dtype)
    try:
        stats = self_instruct(
            target,
            args.out,
            count=args.count,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err
    print(json.dumps({"out": args.out, **stats.summary()}))
    return 0


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
    p.add_argument("--json", help="also write every run's lines to this JSON file")
    add_config_flags(p, RunConfig, title="target", only=("target", "device", "dtype", "threads"))
    p.set_defaults(handler=_run_train_tau_command)


def _run_train_tau_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from draftopd.models.target import load_target
    from draftopd.prompts import load_prompts, render_prompt
    from draftopd.training.tau_eval import GreedyTauEvaluator, evaluate_runs

    runs = [(label, Path(path)) for label, path in _labelled(args.run, "LABEL=RUN_DIR")]
    where = config_from_args(args, RunConfig, out_dir=".")  # the target, device, dtype, threads
    if where.threads:
        torch.set_num_threads(where.threads)
    target = load_target(where.target, device=where.device or "cpu", dtype=where.dtype)
    if target.tokenizer is None:
        raise CommandError(f"target {where.target!r} has no tokenizer")
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


def _run_sft(run: RunConfig, sft: Any, args: argparse.Namespace) -> Any:
    from draftopd.training.sft.pipeline import sft_pipeline

    return sft_pipeline(run, sft, resume=args.resume, progress=not args.no_progress)


def _run_opd(run: RunConfig, opd: Any, args: argparse.Namespace) -> Any:
    from draftopd.training.opd.pipeline import opd_pipeline

    return opd_pipeline(run, opd, resume=args.resume, progress=not args.no_progress)


@dataclass(frozen=True)
class _Stage:
    name: str  # the subcommand
    section: type  # the stage section of a job spec (its fields become the flags)
    run: Callable[
        [RunConfig, Any, argparse.Namespace], Any
    ]  # -> a result with checkpoint, step, tau
    help: str
    description: str
    required: tuple[str, ...] = ()


_STAGES = (
    _Stage(
        "sft",
        SFTConfig,
        _run_sft,
        help="SFT bootstrap: regenerate data with the target, train a drafter",
        description="Prompts in, drafter checkpoint out. Reruns resume both stages; a rerun "
        "with a larger --steps extends the run.",
    ),
    _Stage(
        "opd",
        OPDConfig,
        _run_opd,
        help="Draft-OPD: on-policy rollouts, replay from the error positions, in one process",
        description="Drafter checkpoint in, Draft-OPD checkpoint out (the Celery trainer runs "
        "the same loop). Reruns resume from the newest checkpoint.",
        required=("drafter",),
    ),
)


def _add_stage(stages: Subparsers, stage: _Stage) -> None:
    p = stages.add_parser(
        stage.name,
        help=stage.help,
        description=f"{stage.description} The flags are the fields of the run section and the "
        f"{stage.name} section of a train-job spec.",
    )
    add_config_flags(p, RunConfig, title="run")
    add_config_flags(p, stage.section, title=stage.name, required=stage.required)
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the run in --out (default); --no-resume refuses a non-empty run",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    def handler(args: argparse.Namespace) -> int:
        run = config_from_args(args, RunConfig)
        section: Any = config_from_args(args, stage.section)
        result = stage.run(run, section, args)
        tau = "none" if result.tau is None else f"{result.tau:.3f}"
        sys.stdout.write(f"checkpoint: {result.checkpoint}\nstep: {result.step}\ntau: {tau}\n")
        return 0

    p.set_defaults(handler=handler)


def _run_train_curve_command(args: argparse.Namespace) -> int:
    from draftopd.training.curves import plateau_report, plot_training_curve

    try:
        report = plateau_report(args.metrics)
        sys.stdout.write(report.describe() + "\n")
    except ValueError as err:
        sys.stdout.write(f"no plateau verdict: {err}\n")
    if args.png is None:
        return 0
    try:
        path = plot_training_curve(args.metrics, args.png, smooth=args.smooth)
    except ImportError as err:
        raise CommandError(
            f"plotting needs matplotlib ({err}); install it with `pip install matplotlib`"
        ) from err
    logger.info("wrote %s", path)
    return 0


def _run_train_compare_command(args: argparse.Namespace) -> int:
    from draftopd.training.curves import plot_comparison

    runs = _labelled(args.run, "LABEL=METRICS_JSONL")
    base = _labelled([args.base], "LABEL=METRICS_JSONL")[0] if args.base else None
    try:
        out = plot_comparison(runs, args.png, base=base, title=args.title)
    except ImportError as err:
        raise CommandError(f"plotting needs matplotlib ({err})") from err
    logger.info("wrote %s", out)
    return 0
