"""Errors raised below the routes; ``main.py`` maps each to its HTTP status and message."""

from __future__ import annotations


class NotFoundError(LookupError):
    """An unknown drafter, version, alias or train job (-> 404)."""


class ConflictError(ValueError):
    """The request clashes with the registry's state, e.g. a duplicate name (-> 409)."""


class InvalidArtifactError(ValueError):
    """The uploaded artifact is not an acceptable checkpoint archive (-> 400)."""


class ArtifactTooLargeError(ValueError):
    """The upload is larger than ``max_artifact_bytes`` (-> 413)."""


class QueueUnavailableError(RuntimeError):
    """The Celery broker could not take the train job (-> 503)."""
