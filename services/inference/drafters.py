"""The served drafter (any family: EAGLE-3, DFlash): loading and its version, kept in one
immutable holder.

A request reads the service's ``ServedDrafter`` once when it starts and uses that object to the
end, so replacing the holder (a hot swap) never changes a request that is already running.

Versions: a local checkpoint reports its provenance ``version`` (else ``sha256:<12 hex>`` of its
weights), a random drafter ``random:SEED``, and a registry version ``NAME@VERSION`` (e.g.
``smollm2-eagle3@3``: the registry's drafter name and version number).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftopd.models.checkpoint import (
    WEIGHTS_FILE,
    load_drafter,
    random_drafter_for,
    read_checkpoint_meta,
)
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.wire.formats import parse_random_ref

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ServedDrafter:
    """A loaded drafter and what the API reports about it. Never mutated: swap the whole object."""

    drafter: Drafter  # shared read-only by every request (each has its own proposer)
    version: str  # "NAME@VERSION" (registry), provenance["version"], "sha256:<12 hex>", "random:N"
    path: str | None  # checkpoint directory; None for a random drafter
    provenance: dict[str, Any]  # the checkpoint's training provenance ({} if none)
    sha256: str | None = None  # the registry artifact's sha256 (registry versions only)

    @property
    def architecture(self) -> str:
        return self.drafter.cfg.architecture

    @property
    def built_for(self) -> str:
        return self.drafter.cfg.target_model

    @property
    def draft_vocab_size(self) -> int:
        return self.drafter.cfg.draft_vocab_size


def weights_digest(path: Path) -> str:
    """'sha256:' + the first 12 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:12]


def checkpoint_version(directory: str | Path) -> str:
    """The version a checkpoint declares in its provenance, else its weights' digest."""
    meta = read_checkpoint_meta(directory)
    provenance = meta.get("provenance") or {}
    version = provenance.get("version") if isinstance(provenance, dict) else None
    if version is not None and str(version):
        return str(version)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"drafter checkpoint {directory} has no {WEIGHTS_FILE}")
    return weights_digest(weights)


def load_served_drafter(
    spec: str, target: TargetModel, *, random_architecture: str = "eagle3"
) -> ServedDrafter:
    """Load ``spec`` ('random:SEED', a drafter of family ``random_architecture``, or a checkpoint
    directory of any family) for ``target``."""
    seed = parse_random_ref(spec)
    if seed is not None:
        drafter = random_drafter_for(target, seed=seed, architecture=random_architecture)
        drafter.proposer()  # packs the decode-time weights now, off the request path
        logger.info("serving a random %s drafter (seed %d)", random_architecture, seed)
        return ServedDrafter(drafter=drafter, version=spec, path=None, provenance={})
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise ValueError(f"drafter {spec!r}: not a checkpoint directory nor 'random:SEED'")
    return load_checkpoint_drafter(directory, target, version=checkpoint_version(directory))


def registry_version_label(name: str, version: int) -> str:
    """The version string a registry drafter is reported under: ``NAME@VERSION``."""
    return f"{name}@{version}"


def load_checkpoint_drafter(
    directory: Path, target: TargetModel, *, version: str, sha256: str | None = None
) -> ServedDrafter:
    """Load the checkpoint in ``directory`` as ``version``. ValueError if it is unreadable or
    was built for another target."""
    meta = read_checkpoint_meta(directory)
    drafter = load_drafter(directory, target)
    drafter.proposer()  # packs the decode-time weights now (loads and hot swaps run off the
    # request path), so the first request after a swap does not pay for it
    provenance = meta.get("provenance")
    logger.info("loaded %s drafter %s from %s", drafter.cfg.architecture, version, directory)
    return ServedDrafter(
        drafter=drafter,
        version=version,
        path=str(directory),
        provenance=provenance if isinstance(provenance, dict) else {},
        sha256=sha256,
    )
