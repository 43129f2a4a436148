"""The ``draftopd`` command line: ``main`` dispatches to bench, train, jobs and up.

``main`` imports the app on first call, so modules the app imports (``draftopd.stack.up``) can
import ``draftopd.cli.args`` without a cycle."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from draftopd.cli.app import main as app_main

    return app_main(argv)


__all__ = ["main"]
