"""Alembic: upgrade -> downgrade -> upgrade on empty databases, and the migrated schema matches
the models exactly (autogenerate finds nothing to do)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from services.registry.db import make_engine
from services.registry.migrate import downgrade_base, upgrade_head
from services.registry.models import Base
from tests.services.registry.conftest import scratch_postgres

REPO_ROOT = Path(__file__).resolve().parents[3]
REGISTRY_TABLES = {
    "drafters",
    "versions",
    "metrics",
    "aliases",
    "alias_events",
    "train_jobs",
    "live_metrics",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with scratch_postgres(f"draftopd_registry_migrations_{os.getpid()}") as url:
        yield url


def tables(url: str) -> set[str]:
    engine = make_engine(url, pooled=False)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url, pooled=False)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    assert tables(empty_db) == set()
    upgrade_head(empty_db)
    assert tables(empty_db) == REGISTRY_TABLES | {"alembic_version"}
    downgrade_base(empty_db)
    assert tables(empty_db) == {"alembic_version"}
    upgrade_head(empty_db)
    assert tables(empty_db) == REGISTRY_TABLES | {"alembic_version"}


def test_migrated_schema_matches_the_models(empty_db: str) -> None:
    upgrade_head(empty_db)
    assert schema_differences(empty_db) == []


def test_a_model_change_would_be_detected(empty_db: str) -> None:
    """The comparison is not vacuous: a schema without one index differs from the models."""
    upgrade_head(empty_db)
    engine = make_engine(empty_db, pooled=False)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_train_jobs_status")
    engine.dispose()
    differences = schema_differences(empty_db)
    assert len(differences) == 1
    assert differences[0][0] == "add_index"  # type: ignore[index]


def test_alembic_cli_reads_the_url_from_the_environment(tmp_path: Path) -> None:
    """``alembic upgrade head`` with the root alembic.ini and DRAFTOPD_REGISTRY_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DRAFTOPD_REGISTRY_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade  -> 0001" in result.stderr
    assert "Running upgrade 0001 -> 0002" in result.stderr
    assert "Running upgrade 0002 -> 0003" in result.stderr
    assert tables(url) == REGISTRY_TABLES | {"alembic_version"}
