"""Artifact storage: a small protocol and the local-filesystem store.

A store keeps opaque byte blobs under keys (``<drafter>/<random>.tar``) and hands back a URI that
the ``versions`` table records. ``put_stream`` consumes an iterator of chunks, so an artifact never
sits in memory whole, and computes the sha256 and size on the way. ``LocalArtifactStore`` writes to
a temporary file in the target directory and renames it into place, so a reader never sees a
partial artifact. URIs are ``local:<key>``: relative to the store's root, so the artifact
directory can move. (An S3 store would use ``s3://bucket/key``.)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

LOCAL_SCHEME = "local:"


@dataclass(frozen=True)
class StoredArtifact:
    uri: str  # where the store keeps it, e.g. "local:smollm2-eagle3/4f1c....tar"
    sha256: str  # hex digest of the stored bytes
    size_bytes: int  # number of stored bytes


class ArtifactStore(Protocol):
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredArtifact:
        """Store the concatenated chunks under ``key``; atomic (all or nothing)."""
        ...

    def open(self, uri: str) -> BinaryIO:
        """The stored bytes, for reading (the caller closes it)."""
        ...

    def delete(self, uri: str) -> None:
        """Remove the artifact; a missing one is not an error."""
        ...


class LocalArtifactStore:
    """Artifacts as files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path_for_key(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not key or not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"artifact key {key!r} must be a relative path inside the store")
        return path

    def path(self, uri: str) -> Path:
        """The file behind a ``local:`` URI."""
        if not uri.startswith(LOCAL_SCHEME):
            raise ValueError(f"not a local artifact URI: {uri!r} (expected '{LOCAL_SCHEME}KEY')")
        return self._path_for_key(uri[len(LOCAL_SCHEME) :])

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredArtifact:
        path = self._path_for_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StoredArtifact(uri=LOCAL_SCHEME + key, sha256=digest.hexdigest(), size_bytes=size)

    def open(self, uri: str) -> BinaryIO:
        return self.path(uri).open("rb")

    def delete(self, uri: str) -> None:
        self.path(uri).unlink(missing_ok=True)
