"""The registry service: drafters, versioned artifacts, metrics, aliases and train jobs
(DESIGN.md §1 and §4). FastAPI + SQLAlchemy 2 + Alembic; Postgres in deployment, SQLite embedded.
No torch: it validates train-job specs with the torch-free ``draftopd.job_specs``."""
