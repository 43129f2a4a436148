"""The long schemathesis run of both services (outside CI): every operation, all checks, a time
budget per service, seeds different from CI's. Results go to docs/benchmarks.md.

    PYTHONPATH=. nice .venv/bin/python docs/experiments/fuzz_services.py --minutes 10 \
        --json docs/bench/fuzz_long.json

The registry runs on SQLite with closed reads (every request is fuzzed with and without the
token); inference runs on the tiny random target with the random:0 EAGLE-3 drafter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis.specs.openapi.checks as openapi_checks
from schemathesis.checks import not_a_server_error

from draftopd.models.tiny import build_tiny_target
from services.inference.main import create_app as create_inference
from services.inference.settings import InferenceSettings
from services.registry.main import create_app as create_registry
from services.registry.migrate import upgrade_head
from services.registry.settings import RegistrySettings
from tests.fuzz import FuzzReport, fuzz
from tests.servers import uvicorn_in_thread

TOKEN = "fuzz-token"
ALL_CHECKS = [not_a_server_error] + [
    getattr(openapi_checks, name)
    for name in (
        "response_schema_conformance", "status_code_conformance", "content_type_conformance",
        "response_headers_conformance", "negative_data_rejection", "positive_data_acceptance",
        "missing_required_header", "unsupported_method", "use_after_free",
        "ensure_resource_availability",
    )
]  # fmt: skip


def run_for(minutes: float, passes: Callable[[int], list[FuzzReport]], seed: int) -> dict[str, Any]:
    """Fuzz passes with seeds seed, seed+1, ... until ``minutes`` have passed."""
    deadline = time.monotonic() + minutes * 60
    totals: Counter[int] = Counter()
    requests = server_errors = rounds = 0
    slowest = 0.0
    failures: dict[str, int] = {}
    operations = 0
    while time.monotonic() < deadline:
        for report in passes(seed + rounds):
            operations = max(operations, report.operations)
            requests += report.requests
            server_errors += report.server_errors
            totals.update(report.statuses)
            slowest = max(slowest, report.slowest_s)
            for failure in report.failures:
                key = failure.splitlines()[0][:300]
                failures[key] = failures.get(key, 0) + 1
        rounds += 1
        print(f"  round {rounds}: {requests} requests, {server_errors} server errors", flush=True)
    return {"operations": operations, "requests": requests, "server_errors": server_errors,
            "rounds": rounds, "slowest_s": round(slowest, 2),
            "statuses": {str(k): v for k, v in sorted(totals.items())},
            "check_failures": failures}  # fmt: skip


def fuzz_registry(minutes: float, seed: int, workdir: Path) -> dict[str, Any]:
    db = workdir / "registry.db"
    upgrade_head(f"sqlite:///{db}")
    settings = RegistrySettings(database_url=f"sqlite:///{db}", artifact_dir=workdir / "artifacts",
                                api_token=TOKEN, open_reads=False)  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with uvicorn_in_thread(create_registry(settings), name="fuzz-registry") as (url, _):

        def passes(s: int) -> list[FuzzReport]:
            with_token = fuzz(url, headers=auth, max_examples=60, seed_value=s, checks=ALL_CHECKS)
            without = fuzz(url, headers=None, max_examples=20, seed_value=s, checks=ALL_CHECKS)
            return [with_token, without]

        return run_for(minutes, passes, seed)


def fuzz_inference(minutes: float, seed: int, workdir: Path) -> dict[str, Any]:
    target = build_tiny_target(workdir / "tiny-target")
    settings = InferenceSettings(target=str(target), drafter="random:0", torch_threads=1,
                                 max_concurrency=2)  # fmt: skip
    with uvicorn_in_thread(create_inference(settings), name="fuzz-inference") as (url, _):

        def passes(s: int) -> list[FuzzReport]:
            return [fuzz(url, max_examples=60, seed_value=s, checks=ALL_CHECKS)]

        return run_for(minutes, passes, seed)


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="per service (default 10)")
    parser.add_argument("--seed", type=int, default=1000, help="first seed (CI uses 1-3)")
    parser.add_argument("--service", choices=("registry", "inference", "both"), default="both")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {"seed": args.seed, "minutes_per_service": args.minutes}
    with tempfile.TemporaryDirectory(prefix="draftopd-fuzz-") as tmp:
        for name, run in (("registry", fuzz_registry), ("inference", fuzz_inference)):
            if args.service in (name, "both"):
                print(f"{name}:", flush=True)
                started = time.monotonic()
                results[name] = run(args.minutes, args.seed, Path(tmp) / name)
                results[name]["seconds"] = round(time.monotonic() - started, 1)
                print(json.dumps(results[name], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return (
        0 if all(r["server_errors"] == 0 for k, r in results.items() if isinstance(r, dict)) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
