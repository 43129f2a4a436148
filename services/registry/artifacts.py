"""Artifacts in and out: an uploaded checkpoint archive becomes a registered version, and a
version's artifact is streamed back with its sha256 in ``X-Content-SHA256``.

The upload is read in 1 MiB chunks and streamed into the artifact store, which computes the
sha256 and size on the way (Starlette spools the multipart body to a temporary file beyond 1 MiB,
so nothing the size of the artifact is held in memory). The stored archive is then checked
(``archive.inspect_checkpoint_archive``); a bad one is deleted again and refused.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from services.registry import jobs, repository
from services.registry.archive import (
    CHUNK_BYTES,
    inspect_checkpoint_archive,
    media_type,
    refuse_pickle_name,
    unpacked_limit,
    upload_chunks,
)
from services.registry.errors import InvalidArtifactError, NotFoundError
from services.registry.models import Drafter, Version
from services.registry.storage import ArtifactStore, LocalArtifactStore

SHA256_HEADER = "X-Content-SHA256"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    parent_version: int | None = None  # version number of the same drafter it was trained from
    job_id: str | None = None  # the train job that produced it
    step: int | None = None  # the job's optimizer step at this checkpoint


def register_upload(
    session: Session,
    store: ArtifactStore,
    drafter: Drafter,
    upload: BinaryIO,
    *,
    filename: str | None,
    provenance: Provenance,
    max_bytes: int,
    max_unpacked_bytes: int,
) -> Version:
    """Store, check and register the archive as the drafter's next version."""
    if filename:
        refuse_pickle_name(filename)
    parent = (
        repository.get_version(session, drafter, provenance.parent_version)
        if provenance.parent_version is not None
        else None
    )
    job = jobs.get_job(session, provenance.job_id) if provenance.job_id is not None else None
    if job is not None and job.drafter_id != drafter.id:
        raise InvalidArtifactError(
            f"train job {job.id!r} trains drafter {job.drafter.name!r}, not {drafter.name!r}"
        )
    stored = store.put_stream(
        f"{drafter.name}/{uuid.uuid4().hex}.tar", upload_chunks(upload, max_bytes=max_bytes)
    )
    try:
        with store.open(stored.uri) as fileobj:
            config = inspect_checkpoint_archive(
                fileobj, max_bytes=unpacked_limit(stored.size_bytes, max_unpacked_bytes)
            )
        _check_architecture(drafter, config.get("architecture"))
        version = repository.add_version(
            session, drafter, stored, config=config, parent=parent, job=job, step=provenance.step
        )
    except Exception:
        store.delete(stored.uri)
        raise
    logger.info("registered %s v%d (%d bytes)", drafter.name, version.number, stored.size_bytes)
    return version


def _check_architecture(drafter: Drafter, declared: object) -> None:
    if declared is not None and declared != drafter.architecture:
        raise InvalidArtifactError(
            f"config.json declares architecture {declared!r} but drafter {drafter.name!r} is "
            f"{drafter.architecture!r}"
        )


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk


def artifact_response(store: ArtifactStore, version: Version) -> Response:
    """The archive, streamed from the store, with its sha256 (header and ETag)."""
    label = f"drafter {version.drafter.name!r} version {version.number}"
    try:
        stream = store.open(version.artifact_uri)
    except FileNotFoundError as err:
        raise NotFoundError(f"the artifact of {label} is missing from the store") from err
    head = stream.read(2)
    stream.seek(0)
    kind = media_type(head)
    suffix = ".tar.gz" if kind == "application/gzip" else ".tar"
    headers = {SHA256_HEADER: version.sha256, "ETag": f'"{version.sha256}"'}
    filename = f"{version.drafter.name}-v{version.number}{suffix}"
    if isinstance(store, LocalArtifactStore):
        stream.close()
        return FileResponse(
            store.path(version.artifact_uri), media_type=kind, filename=filename, headers=headers
        )
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    headers["Content-Length"] = str(version.size_bytes)
    return StreamingResponse(_chunks(stream), media_type=kind, headers=headers)
