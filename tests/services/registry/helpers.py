"""Helpers for the registry tests: small checkpoints, archives and requests."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.numpy import save
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from draftopd.wire.registry_client import RegistryClient
from services.registry.main import create_app
from services.registry.migrate import upgrade_head
from services.registry.settings import RegistrySettings
from tests.servers import uvicorn_in_thread

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
TOKEN = "registry-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DRAFTER = "smollm2-eagle3"


def checkpoint_files(*, seed: int = 0, architecture: str = "eagle3") -> dict[str, bytes]:
    """The files of a small drafter checkpoint: safetensors weights and a JSON config."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {
        "fc.weight": rng.standard_normal((8, 24)).astype(np.float32),
        "d2t": np.arange(16, dtype=np.int64),
    }
    config = {"architecture": architecture, "config": {"hidden_size": 8}, "provenance": {}}
    return {
        "model.safetensors": save(weights),
        "config.json": json.dumps(config, sort_keys=True).encode(),
    }


def write_checkpoint(directory: Path, *, seed: int = 0, architecture: str = "eagle3") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in checkpoint_files(seed=seed, architecture=architecture).items():
        (directory / name).write_bytes(data)
    return directory


def tar_bytes(files: dict[str, bytes], *, mode: str = "w") -> bytes:
    """A tar archive (``mode`` "w" or "w:gz") of ``files`` (name -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def checkpoint_tar(*, seed: int = 0, mode: str = "w", architecture: str = "eagle3") -> bytes:
    return tar_bytes(checkpoint_files(seed=seed, architecture=architecture), mode=mode)


def upload(client: TestClient, name: str, data: bytes, **form: Any) -> Any:
    """POST an archive as the next version of ``name``; returns the response."""
    return client.post(
        f"/drafters/{name}/versions",
        files={"artifact": ("checkpoint.tar", data, "application/x-tar")},
        data={key: str(value) for key, value in form.items()},
        headers=AUTH,
    )


def create_drafter(client: TestClient, name: str = DRAFTER, **fields: Any) -> Any:
    body = {"name": name, "target_model": "HuggingFaceTB/SmolLM2-135M-Instruct", **fields}
    response = client.post("/drafters", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """The registry app on a free port (uvicorn in a thread); yields the base URL."""
    with uvicorn_in_thread(app, name="registry-uvicorn") as (url, _):
        yield url


@contextmanager
def live_registry(
    redis_url: str, tmp_path: Path, drafter: str, target_model: str = "tiny"
) -> Iterator[RegistryClient]:
    """A migrated SQLite registry served on a free port, with ``drafter`` created; yields a
    client holding the write token."""
    db = tmp_path / "registry.db"
    upgrade_head(f"sqlite:///{db}")
    settings = RegistrySettings(
        database_url=f"sqlite:///{db}",
        artifact_dir=tmp_path / "artifacts",
        api_token=TOKEN,
        redis_url=redis_url,
    )
    with live_server(create_app(settings)) as url, RegistryClient(url, token=TOKEN) as client:
        client.create_drafter(drafter, target_model=target_model)
        yield client


def next_events(pubsub: Any, count: int, *, drafter: str = DRAFTER) -> list[dict[str, Any]]:
    """The next ``count`` events about ``drafter`` (other processes may share the channel)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(events) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            event = json.loads(message["data"])
            if event["drafter"] == drafter:
                events.append(event)
    return events


@contextmanager
def scratch_postgres(name: str) -> Iterator[str]:
    """A new, empty Postgres database ``name`` (dropped afterwards); yields its URL."""
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        pytest.fail(f"Postgres is not reachable on 127.0.0.1:5432 as user postgres ({err})")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
