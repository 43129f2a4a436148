# The registry and its one-shot migration: torch-free (docs/design.md §5, docker-compose.yml).
# Build from the repository root: docker build -f docker/registry.Dockerfile -t draftopd-registry .
# It installs only pyproject's `registry` extra (FastAPI, SQLAlchemy, Alembic, psycopg, Celery
# client, Redis) and runs the sources from /app, so migrations/ sits where
# services/registry/migrate.py looks for it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app:/app/shared

WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml).
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['registry']; print('\n'.join(deps))" > /tmp/registry-requirements.txt \
    && pip install -r /tmp/registry-requirements.txt \
    && rm /tmp/registry-requirements.txt

COPY alembic.ini ./
COPY migrations ./migrations
COPY shared/draftopd ./shared/draftopd
COPY services/__init__.py ./services/__init__.py
COPY services/registry ./services/registry

# Artifacts live on a volume mounted at /data; a new named volume takes this directory's owner.
RUN useradd --create-home --uid 10001 draftopd \
    && mkdir -p /data/artifacts \
    && chown -R draftopd /data
USER draftopd

EXPOSE 8003
CMD ["python", "-m", "uvicorn", "services.registry.main:create_app", "--factory", \
     "--host", "0.0.0.0", "--port", "8003"]
