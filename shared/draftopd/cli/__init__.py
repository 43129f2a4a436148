"""The ``draftopd`` command line: ``main`` dispatches to bench, train, jobs and up."""

from draftopd.cli.app import main

__all__ = ["main"]
