"""draftopd: Draft-OPD (on-policy distillation) for speculative-decoding drafters.

The library holds all model and algorithm code. It never imports FastAPI, Celery or SQLAlchemy;
services import it, never the other way round.
"""

__version__ = "0.1.0"
