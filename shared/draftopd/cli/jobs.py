"""``draftopd jobs``: list, watch and cancel the registry's train jobs (docs/design.md §4).

Torch-free: it talks to the registry through ``RegistryClient`` (httpx) and draws with tqdm.
Exit codes: 0 done (a watched job succeeded), 1 a watched job failed or was cancelled (or the
registry refused the request), 2 a bad argument (an unknown job id, an unreachable registry, a
refused token), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from tqdm import tqdm

from draftopd.cli.args import CommandError, Subparsers, positive_float, positive_int
from draftopd.wire.formats import FINISHED_STATUSES, JOB_STATUSES
from draftopd.wire.registry_client import RegistryClient, RegistryError, TransportError

logger = logging.getLogger(__name__)

URL_ENV = "DRAFTOPD_REGISTRY_URL"
TOKEN_ENV = "DRAFTOPD_REGISTRY_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8003"
INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
# optional numbers shown beside the bar when the job record carries them
BAR_METRICS = ("tau", "loss")
TABLE_COLUMNS = ("id", "mode", "drafter", "status", "step/total", "progress", "tau", "updated")


def add_jobs(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("jobs", help="list, watch or cancel the registry's train jobs")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="train jobs as a table, newest first")
    listing.add_argument("--status", choices=JOB_STATUSES, help="only jobs with this status")
    listing.add_argument("--drafter", help="only jobs of this drafter")
    listing.add_argument("--limit", type=positive_int, default=20, help="at most N (default 20)")
    add_registry_args(listing)
    listing.set_defaults(handler=_run_list_command)

    watch = actions.add_parser(
        "watch",
        help="follow a job with a progress bar until it ends",
        description="Exit 0 when the job succeeds, 1 when it fails or is cancelled.",
    )
    watch.add_argument("job_id", metavar="ID", help="the train job's id")
    watch.add_argument(
        "--interval", type=positive_float, default=2.0, help="seconds between polls (default 2)"
    )
    add_registry_args(watch)
    watch.set_defaults(handler=_run_watch_command)

    cancel = actions.add_parser("cancel", help="cancel a job (needs the registry's token)")
    cancel.add_argument("job_id", metavar="ID", help="the train job's id")
    add_registry_args(cancel)
    cancel.set_defaults(handler=_run_cancel_command)


def add_registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry-url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the registry (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"the registry's API token (default: ${TOKEN_ENV})",
    )


@contextmanager
def registry_session(args: argparse.Namespace) -> Iterator[RegistryClient]:
    """A client for ``--registry-url``; its errors become messages that name the cause."""
    url = args.registry_url
    job_id = getattr(args, "job_id", None)
    if not logger.isEnabledFor(logging.DEBUG):  # httpx logs every poll at INFO: under the bar
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with RegistryClient(url, token=args.token, timeout=30.0) as client:
            yield client
    except TransportError as err:
        raise ValueError(f"cannot reach the registry at {url} ({err})") from err
    except RegistryError as err:
        if err.status_code == 404 and job_id is not None:
            raise ValueError(f"no train job {job_id!r} at {url}") from err
        if err.status_code in (401, 403):
            raise ValueError(
                f"the registry at {url} refused the request ({err.status_code}: {err.detail}); "
                f"pass --token or set ${TOKEN_ENV}"
            ) from err
        if err.status_code == 422:  # a value the registry refuses (e.g. a malformed name)
            raise ValueError(str(err)) from err
        raise CommandError(str(err)) from err  # 409 (the job has finished), 5xx


# -- list -----------------------------------------------------------------------------------------
def _run_list_command(args: argparse.Namespace) -> int:
    with registry_session(args) as client:
        jobs = client.list_train_jobs(status=args.status, drafter=args.drafter, limit=args.limit)
    sys.stdout.write(format_table(jobs) if jobs else "no train jobs\n")
    return 0


def format_table(jobs: list[dict[str, Any]]) -> str:
    """Jobs as an aligned text table, one row each, under a header."""
    rows = [TABLE_COLUMNS] + [_table_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "".join(line.rstrip() + "\n" for line in lines)


def _table_row(job: dict[str, Any]) -> tuple[str, ...]:
    updated = datetime.fromisoformat(job["updated_at"]).strftime("%Y-%m-%d %H:%M:%S")
    return (
        job["id"],
        job["mode"],
        job["drafter"],
        job["status"],
        _steps(job),
        f"{100 * job['progress']:.0f}%",
        _number(job.get("tau")),
        updated,
    )


def _steps(job: dict[str, Any]) -> str:
    step = job.get("step")
    total = job.get("total_steps")
    return f"{'-' if step is None else step}/{'-' if total is None else total}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- watch ----------------------------------------------------------------------------------------
def _run_watch_command(args: argparse.Namespace) -> int:
    try:
        with registry_session(args) as client:
            logger.info("watching train job %s at %s", args.job_id, args.registry_url)
            job = watch_job(client, args.job_id, interval=args.interval)
    except KeyboardInterrupt:
        sys.stderr.write(f"stopped watching job {args.job_id} (it keeps running)\n")
        return INTERRUPTED
    sys.stdout.write(format_outcome(job))
    if job["status"] == "failed":
        raise CommandError(f"job {job['id']} failed: {job.get('error') or 'no error reported'}")
    if job["status"] == "cancelled":
        raise CommandError(f"job {job['id']} was cancelled")
    return 0


def watch_job(client: RegistryClient, job_id: str, *, interval: float) -> dict[str, Any]:
    """Poll the job every ``interval`` seconds, drawing a progress bar over its steps (tqdm's
    rate and ETA count only the steps seen while watching); returns the finished job."""
    job = client.get_train_job(job_id)
    bar = tqdm(
        total=job.get("total_steps"),
        initial=job.get("step") or 0,
        desc=f"job {job_id[:8]}",
        unit="step",
        dynamic_ncols=True,
    )
    with bar:
        while True:
            _draw(bar, job)
            if job["status"] in FINISHED_STATUSES:
                return job
            time.sleep(interval)
            job = client.get_train_job(job_id)


def _draw(bar: tqdm, job: dict[str, Any]) -> None:
    total = job.get("total_steps")
    if total is not None and total != bar.total:
        bar.total = total
    step = job.get("step") or 0
    if step < bar.n:  # the trainer restarted from an earlier checkpoint
        bar.reset(total=bar.total)
    shown = {name: _number(job[name]) for name in BAR_METRICS if job.get(name) is not None}
    bar.set_postfix(status=job["status"], **shown, refresh=False)
    bar.update(step - bar.n)
    bar.refresh()


def format_outcome(job: dict[str, Any]) -> str:
    """The finished job's summary: status, final step, tau and the versions it produced."""
    versions = ", ".join(str(v) for v in job.get("produced_versions") or []) or "none"
    return (
        f"job {job['id']} {job['status']}\n"
        f"step: {_steps(job)}\n"
        f"tau: {_number(job.get('tau'))}\n"
        f"versions: {versions}\n"
    )


# -- cancel ---------------------------------------------------------------------------------------
def _run_cancel_command(args: argparse.Namespace) -> int:
    with registry_session(args) as client:
        job = client.cancel_train_job(args.job_id)
    state = job["status"] if job["status"] == "cancelled" else f"{job['status']}, cancel requested"
    sys.stdout.write(f"job {job['id']}: {state}\n")
    return 0
