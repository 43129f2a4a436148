"""Programmatic Alembic for the registry schema (``migrations/`` at the repository root).

``upgrade_head(url)`` is what tests and ``draftopd up`` call before starting the registry;
``python -m services.registry.migrate [URL]`` does the same from a shell (the URL defaults to
``DRAFTOPD_REGISTRY_DATABASE_URL`` / the settings). ``alembic upgrade head`` with the root
``alembic.ini`` is equivalent. The app itself never creates tables.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
URL_ATTRIBUTE = "database_url"  # Config.attributes key that migrations/env.py reads first


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` (passed as an attribute: no ini-file '%' escaping)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ValueError(f"no Alembic migrations at {MIGRATIONS_DIR} (run from a source checkout)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes[URL_ATTRIBUTE] = url
    return config


def upgrade_head(url: str) -> None:
    """Create or update the registry schema at ``url`` to the newest revision."""
    command.upgrade(alembic_config(url), "head")


def downgrade_base(url: str) -> None:
    """Drop every registry table (each migration's ``downgrade``)."""
    command.downgrade(alembic_config(url), "base")


def current_revision(connection: Connection) -> str | None:
    """The schema's Alembic revision; None for a database never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


def main() -> None:
    from services.registry.settings import get_settings

    parser = argparse.ArgumentParser(description="Upgrade the registry schema to head.")
    parser.add_argument("url", nargs="?", help="SQLAlchemy URL (default: the settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    upgrade_head(args.url or get_settings().database_url)


if __name__ == "__main__":
    main()
