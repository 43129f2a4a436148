"""Fixtures for the registry: every test that touches the database runs twice, on SQLite (a
temporary file) and on the machine's real Postgres (127.0.0.1:5432, a scratch database created for
the session and dropped after it). Redis is the real server (the ``redis_url`` fixture, db 13):
it carries the alias events and is the Celery broker for train jobs.

The registry needs no torch, so ``_one_torch_thread`` (an autouse fixture of tests/conftest.py
that imports torch) is overridden here with one that does nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from services.registry.events import ALIAS_CHANNEL
from services.registry.main import create_app
from services.registry.migrate import upgrade_head
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import TOKEN, scratch_postgres

TABLES = ("aliases", "metrics", "versions", "train_jobs", "drafters")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Overrides the torch-importing autouse fixture of tests/conftest.py: no torch here."""
    yield


# -- databases ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated scratch Postgres database for the whole session."""
    with scratch_postgres(f"draftopd_registry_test_{os.getpid()}") as url:
        upgrade_head(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test gets a copy (cheaper than migrating every time)."""
    path = tmp_path_factory.mktemp("registry-template") / "registry.db"
    upgrade_head(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated registry database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "registry.db"
        path.write_bytes(request.getfixturevalue("sqlite_template").read_bytes())
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


# -- apps -----------------------------------------------------------------------------------------


@pytest.fixture
def make_settings(db_url: str, redis_url: str, tmp_path: Path) -> Callable[..., RegistrySettings]:
    def make(**overrides: Any) -> RegistrySettings:
        values: dict[str, Any] = {
            "database_url": db_url,
            "artifact_dir": tmp_path / "artifacts",
            "api_token": TOKEN,
            "redis_url": redis_url,
        }
        values.update(overrides)
        return RegistrySettings(**values)

    return make


@pytest.fixture
def client(make_settings: Callable[..., RegistrySettings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


@pytest.fixture
def subscriber(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(ALIAS_CHANNEL)
    deadline = time.monotonic() + 5
    while not pubsub.subscribed and time.monotonic() < deadline:
        pubsub.get_message(timeout=0.1)
    assert pubsub.subscribed
    yield pubsub
    pubsub.close()
    client.close()
