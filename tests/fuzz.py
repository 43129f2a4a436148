"""Schemathesis against a live service's OpenAPI schema: every operation, a fixed seed, a bounded
number of examples. Used by the CI fuzz tests (tests/services/*/test_fuzz.py) and by the longer
run of docs/experiments/fuzz_services.py."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

CI_CHECKS = [not_a_server_error, response_schema_conformance]


@dataclass
class FuzzReport:
    operations: int = 0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    slowest_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        counts = f"{self.operations} operations, {self.requests} requests"
        errors = f"{self.server_errors} server errors, slowest {self.slowest_s:.1f} s"
        return f"{counts}, {errors} ({codes})"


def fuzz(
    base_url: str,
    *,
    headers: dict[str, str] | None = None,
    max_examples: int = 20,
    seed_value: int = 0,
    checks: list[Callable[..., Any]] | None = None,
    deadline_s: float | None = None,
) -> FuzzReport:
    """Run ``max_examples`` generated requests against each operation (until ``deadline_s``
    seconds have passed, if given); collect statuses and check failures."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations += 1

        @seed(seed_value)
        @settings(
            max_examples=max_examples, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            t0 = time.monotonic()
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            report.slowest_s = max(report.slowest_s, time.monotonic() - t0)
            report.requests += 1
            report.statuses[response.status_code] += 1
            report.server_errors += int(response.status_code >= 500)
            case.validate_response(response, checks=checks or CI_CHECKS)

        try:
            run()
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            kinds = [line.strip("- ") for line in str(err).splitlines() if line.startswith("- ")]
            name = f"{operation.method.upper()} {operation.path}"
            report.failures.append(f"{name}: {'; '.join(kinds) or str(err)[:500]}")
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            break
    return report


__all__ = ["CI_CHECKS", "FuzzReport", "fuzz"]
