"""The ``draftopd`` command line (docs/design.md §5).

Subcommands:
- ``bench``: the benchmark protocol (docs/design.md §6, ``draftopd.bench``);
- ``serve``: the inference service in the foreground (uvicorn, replacing this process);
- ``up``: the whole local stack as supervised child processes (``draftopd.stack.up``);
- ``train sft|opd|curve``: training from the command line (``draftopd.cli.train``).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its flags and sets
``handler``; add ``jobs`` the same way and list them in ``SUBCOMMANDS``. The library
never imports a service: services are started as child processes (``python -m uvicorn
<module>:create_app --factory``, ``python -m celery``).
Heavy imports (torch, transformers) happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from draftopd.cli.args import (
    CommandError,
    Subparsers,
    add_config_flags,
    config_from_args,
    non_negative_int,
    positive_float,
)
from draftopd.cli.interop import add_export, add_import
from draftopd.cli.jobs import add_jobs
from draftopd.cli.train import add_train
from draftopd.stack.supervisor import STARTUP_TIMEOUT_S, check_port_free
from draftopd.stack.up import StackOptions, default_data_dir, run_up, uvicorn_command

logger = logging.getLogger(__name__)

INFERENCE_APP = "services.inference.main:create_app"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftopd", description="Train and serve speculative-decoding drafters (Draft-OPD)."
    )
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except (ValueError, CommandError) as err:
        logger.debug("%s failed", args.command, exc_info=True)
        status = 2 if isinstance(err, ValueError) else 1
        parser.exit(status, f"draftopd {args.command}: error: {err}\n")


def configure_logging(level: str) -> None:
    """Configure logging once, for the whole process (stderr; stdout is for results)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger().setLevel(level)


# -- bench --------------------------------------------------------------------------------------
def _add_bench(subparsers: Subparsers) -> None:
    from draftopd.bench_config import BenchConfig  # torch-free: --help stays fast

    p = subparsers.add_parser(
        "bench", help="benchmark plain vs speculative decoding (docs/design.md §6)"
    )
    add_config_flags(p, BenchConfig, title="bench", defaults=True)
    p.add_argument("--json", help="write the JSON report to this path ('-' = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=_run_bench_command)


def _run_bench_command(args: argparse.Namespace) -> int:
    from draftopd.bench import format_summary, run_bench, run_costs, write_report
    from draftopd.bench_config import BenchConfig

    config = config_from_args(args, BenchConfig, progress=not args.no_progress)
    if config.costs:
        from draftopd.costs import format_costs

        table = run_costs(config)
        if args.json:
            logger.info("wrote %s", write_report(table, args.json))
        sys.stdout.write(format_costs(table))
        return 0
    report = run_bench(config)
    if args.json == "-":
        import json

        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif args.json:
        logger.info("wrote %s", write_report(report, args.json))
    sys.stdout.write(format_summary(report))
    return 0


# -- serve --------------------------------------------------------------------------------------
def _add_host_port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def _add_serve(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the inference service in the foreground")
    _add_host_port(p)
    p.set_defaults(handler=_run_serve_command)


def _run_serve_command(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)
    argv = uvicorn_command(INFERENCE_APP, host=args.host, port=args.port, log_level=args.log_level)
    logger.info("exec %s", " ".join(argv))
    os.execvp(argv[0], argv)  # replaces this process; returns only on failure (OSError)


# -- compare ------------------------------------------------------------------------------------
def _add_compare(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired per-prompt tau comparison of two bench reports (mean difference with a 95%% "
        "CI, sign test)",
    )
    p.add_argument(
        "baseline",
        metavar="A.json",
        help="draftopd bench --json report of A, or a `draftopd train tau` run file "
        "RUN/tau_eval.jsonl (its last checkpoint; RUN/tau_eval.jsonl@N for step N)",
    )
    p.add_argument("candidate", metavar="B.json", help="the same for B, on the same prompts")
    p.add_argument("--labels", default="A,B", help="names of A and B (default %(default)s)")
    p.add_argument("--json", dest="json_out", help="also write the comparison here ('-' = stdout)")
    p.set_defaults(handler=_run_compare_command)


def _run_compare_command(args: argparse.Namespace) -> int:
    from draftopd.paired import format_comparison, paired_comparison, report_taus

    labels = args.labels.split(",")
    if len(labels) != 2 or not all(labels):
        raise CommandError(f"--labels needs two names separated by a comma, got {args.labels!r}")
    try:
        result = paired_comparison(report_taus(args.baseline), report_taus(args.candidate))
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from err
    print(format_comparison(result, labels[0], labels[1]))
    if args.json_out:
        text = json.dumps({"a": labels[0], "b": labels[1], **result.to_dict()}, indent=2)
        if args.json_out == "-":
            print(text)
        else:
            Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return 0


# -- up -----------------------------------------------------------------------------------------
def _add_up(subparsers: Subparsers) -> None:
    defaults = StackOptions(target="smollm2", data_dir=default_data_dir())
    p = subparsers.add_parser(
        "up",
        help="start the whole stack locally: Redis, registry, inference, rollout worker, trainer",
        description="Embedded Redis (unless REDIS_URL is set) and SQLite (unless DATABASE_URL is "
        "set) under --data-dir; the services run as child processes with their logs in "
        "<data-dir>/logs. Ctrl-C stops everything.",
    )
    p.add_argument("--target", default=defaults.target, help="smollm2 (default), a dir or a .gguf")
    p.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="default: %(default)s")
    p.add_argument("--host", default=defaults.host, help="HTTP bind address (default %(default)s)")
    for names, default, what in (
        (["--inference-port", "--port"], defaults.inference_port, "inference (%(default)s)"),
        (["--rollout-port"], defaults.rollout_port, "the rollout worker (%(default)s)"),
        (["--registry-port"], defaults.registry_port, "the registry (%(default)s)"),
        (["--redis-port"], defaults.redis_port, "the embedded Redis (default: a free one)"),
    ):
        p.add_argument(*names, type=_port, default=default, help=f"port of {what}")
    p.add_argument(
        "--drafter-name",
        default=defaults.drafter_name,
        help="registry drafter that inference serves (created if missing; default %(default)s)",
    )
    p.add_argument(
        "--drafter-architecture",
        choices=("eagle3", "dflash"),
        default=defaults.drafter_architecture,
        help="family of the drafter up creates when it is missing (default %(default)s)",
    )
    p.add_argument("--alias", default=defaults.drafter_alias, help="alias followed (%(default)s)")
    p.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=STARTUP_TIMEOUT_S,
        help="seconds to wait for each start-up stage (default %(default)s)",
    )
    p.set_defaults(handler=_run_up_command)


def _port(value: str) -> int:
    port = non_negative_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def _run_up_command(args: argparse.Namespace) -> int:
    options = StackOptions(
        target=args.target,
        data_dir=args.data_dir.expanduser(),
        host=args.host,
        inference_port=args.inference_port,
        rollout_port=args.rollout_port,
        registry_port=args.registry_port,
        redis_port=args.redis_port,
        drafter_name=args.drafter_name,
        drafter_architecture=args.drafter_architecture,
        drafter_alias=args.alias,
        startup_timeout_s=args.startup_timeout,
        log_level=args.log_level,
    )
    return run_up(options)


SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_bench,
    _add_serve,
    _add_up,
    _add_compare,
    add_train,
    add_jobs,
    add_export,
    add_import,
)
