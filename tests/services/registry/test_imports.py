"""The registry and its client load no torch; the client loads no FastAPI or SQLAlchemy.

Checked in a fresh interpreter: other tests in the session may have imported torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def imported_after(module: str) -> set[str]:
    """Top-level packages loaded by importing ``module`` in a new interpreter."""
    code = (
        f"import sys, json, {module}; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def test_registry_app_does_not_import_torch() -> None:
    loaded = imported_after("services.registry.main")
    assert "torch" not in loaded
    assert {"fastapi", "sqlalchemy", "celery"} <= loaded  # the check sees real imports


def test_registry_client_is_light() -> None:
    loaded = imported_after("draftopd.wire.registry_client")
    assert "httpx" in loaded
    assert not loaded & {"torch", "fastapi", "sqlalchemy", "celery", "starlette"}
