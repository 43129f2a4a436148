"""Alembic environment for the registry schema (tables in ``services.registry.models``).

The database URL is, in order: the ``database_url`` attribute that
``services.registry.migrate.alembic_config`` sets, ``sqlalchemy.url`` in the ini file, then
``DRAFTOPD_REGISTRY_DATABASE_URL`` / the registry settings' default. SQLite migrations run in
batch mode (SQLite cannot ALTER most things in place).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from services.registry.db import is_sqlite, make_engine, normalize_url
from services.registry.migrate import URL_ATTRIBUTE
from services.registry.models import Base
from services.registry.settings import RegistrySettings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get(URL_ATTRIBUTE) or config.get_main_option("sqlalchemy.url")
    return str(url) if url else RegistrySettings().database_url


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade head --sql``)."""
    url = database_url()
    context.configure(
        url=normalize_url(url),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite(url),
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
