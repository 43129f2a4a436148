"""The registry service: drafters, versioned artifacts, metrics, aliases and train jobs
(docs/design.md §1 and §4). FastAPI + SQLAlchemy 2 + Alembic; Postgres in deployment, SQLite
embedded.
No torch: it validates train-job specs with the torch-free ``draftopd.wire.job_specs``."""
