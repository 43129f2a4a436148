"""A real registry for the hot-swap tests: migrated SQLite, the real Redis for alias events, uvicorn
on a free port in a thread. Shared by tests/services/inference, tests/services/rollout_worker and
tests/integration/test_hot_swap.py.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.wire.registry_client import RegistryClient
from services.registry.main import create_app
from services.registry.migrate import upgrade_head
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import live_server

TOKEN = "hot-swap-token"


@dataclass
class LiveRegistry:
    base_url: str
    artifact_dir: Path
    client: RegistryClient  # authenticated (writes)

    def new_drafter(self, target_model: str = "tiny", architecture: str = "eagle3") -> str:
        """A drafter with a unique name (the alias channel is shared by every Redis database)."""
        name = f"tiny-{architecture}-{uuid.uuid4().hex[:8]}"
        self.client.create_drafter(name, target_model=target_model, architecture=architecture)
        return name

    def upload_random(
        self,
        name: str,
        target: TargetModel,
        *,
        seed: int,
        workdir: Path,
        architecture: str = "eagle3",
        **provenance: object,
    ) -> dict[str, object]:
        """Upload a seeded random drafter of a family for ``target`` as ``name``'s next
        version."""
        drafter = random_drafter_for(
            target, seed=seed, draft_vocab_size=target.vocab_size - 20, architecture=architecture
        )
        checkpoint = save_drafter(
            drafter, workdir / f"{name}-seed{seed}-{uuid.uuid4().hex[:6]}", provenance=provenance
        )
        return self.client.upload_version(name, checkpoint)

    def corrupt_stored(self, sha256: str) -> Path:
        """Flip one byte of the stored artifact whose sha256 is ``sha256`` (it stays a tar)."""
        for path in self.artifact_dir.rglob("*"):
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
                data = bytearray(path.read_bytes())
                data[600] ^= 0xFF
                path.write_bytes(bytes(data))
                return path
        raise AssertionError(f"no stored artifact with sha256 {sha256}")


@contextmanager
def running_registry(workdir: Path, redis_url: str) -> Iterator[LiveRegistry]:
    """A registry (SQLite under ``workdir``, events on ``redis_url``) on a free port."""
    database = f"sqlite:///{workdir / 'registry.db'}"
    upgrade_head(database)
    settings = RegistrySettings(
        database_url=database,
        artifact_dir=workdir / "artifacts",
        api_token=SecretStr(TOKEN),
        redis_url=redis_url,
    )
    with live_server(create_app(settings)) as url, RegistryClient(url, token=TOKEN) as client:
        yield LiveRegistry(base_url=url, artifact_dir=workdir / "artifacts", client=client)


def wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0, what: str = "") -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.02)
    return time.monotonic() - start
