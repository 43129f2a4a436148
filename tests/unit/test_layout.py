"""The library's layout rules (docs/design.md, "Code layout"), checked on the source tree.

- Nothing under shared/draftopd imports a web, queue or database library, except the two named
  torch-free client modules the services share.
- Outside the EAGLE-3 family's own package, nothing imports its model class: the rest of the tree
  goes through the drafter seam (``models/drafter.py``) and the family registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[2] / "shared" / "draftopd"
BANNED = ("redis", "httpx", "fastapi", "celery", "sqlalchemy")
CLIENT_MODULES = {"wire/registry_client.py": {"httpx"}, "wire/rollout_queue.py": {"redis"}}


def imported_roots(source: str) -> set[str]:
    """Top-level package names a module imports (at module level or inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def imported_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def library_modules() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_library_module_imports_no_service_framework(path: Path) -> None:
    relative = path.relative_to(LIBRARY).as_posix()
    allowed = CLIENT_MODULES.get(relative, set())
    found = imported_roots(path.read_text(encoding="utf-8")) & set(BANNED)
    assert found <= allowed, f"{relative} imports {sorted(found - allowed)}"


def test_the_checker_sees_imports_inside_functions() -> None:
    source = "import os\ndef f():\n    import redis.client\n    from celery import Celery\n"
    assert imported_roots(source) == {"os", "redis", "celery"}


def test_only_the_eagle3_package_and_the_family_registry_import_the_model_class() -> None:
    importers = {
        path.relative_to(LIBRARY).as_posix()
        for path in library_modules()
        if "Eagle3Drafter" in imported_names(path.read_text(encoding="utf-8"))
    }
    assert importers
    assert all(p.startswith("models/eagle3/") or p == "models/families.py" for p in importers), (
        importers
    )
    services = Path(__file__).resolve().parents[2] / "services"
    assert not [
        p for p in services.rglob("*.py") if "Eagle3Drafter" in imported_names(p.read_text())
    ]
