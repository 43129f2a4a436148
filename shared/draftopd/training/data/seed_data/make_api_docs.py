"""Regenerate ``api_docs.json``, the API snapshot behind the corpus's stdlib and networkx prompts.

Run by hand, never at corpus build time (the snapshot keeps the corpus the same on every Python):

    python shared/draftopd/training/data/seed_data/make_api_docs.py

It keeps the file's ``stdlib_modules`` list, imports each module (all are free of import-time side
effects), and records public functions and classes with a signature and a one-paragraph docstring
summary; plus the language-reference topics of ``pydoc_data`` and networkx's graph algorithms.
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("api_docs.json")
MAX_SUMMARY_CHARS = 240  # longer first paragraphs are cut to their first sentence


def snapshot_api_docs(
    stdlib_modules: Sequence[str], *, networkx: bool = True, topics: bool = True
) -> dict[str, Any]:
    """Entries ``{stream, source, module, name, kind, signature, summary}`` (topics: ``title``)."""
    entries: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()  # (defining module, qualname): re-exports appear once
    for module_name in stdlib_modules:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if n[0] != "_"]
        for name in sorted(set(names)):
            entry = _api_entry(module_name, name, getattr(module, name, None), seen)
            if entry is not None:
                entries.append({"stream": "stdlib-doc", "source": "stdlib-doc", **entry})
    if topics:
        entries += _topic_entries()
    versions = {"python": platform.python_version()}
    if networkx:
        entries += _networkx_entries(seen, versions)
    return {"generated_with": versions, "stdlib_modules": list(stdlib_modules), "entries": entries}


def write_snapshot(snapshot: dict[str, Any], path: Path = SNAPSHOT) -> Path:
    """Write ``snapshot`` with one entry per line, so that regenerating gives small diffs."""
    head = {k: v for k, v in snapshot.items() if k != "entries"}
    lines = ",\n".join(json.dumps(e, ensure_ascii=False) for e in snapshot["entries"])
    text = json.dumps(head, ensure_ascii=False)[:-1] + f', "entries": [\n{lines}\n]}}\n'
    path.write_text(text, encoding="utf-8")
    return path


def _api_entry(
    module: str, name: str, obj: Any, seen: set[tuple[str, str]]
) -> dict[str, Any] | None:
    documented = inspect.isroutine(obj) or inspect.isclass(obj)
    if not (documented or (module.startswith("networkx.") and callable(obj))):
        return None
    key = (getattr(obj, "__module__", None) or module, getattr(obj, "__qualname__", name))
    summary = _summary(inspect.getdoc(obj))
    if key in seen or summary is None:
        return None
    seen.add(key)
    try:
        signature: str | None = str(inspect.signature(obj))
    except (TypeError, ValueError):  # many builtins have no introspectable signature
        signature = None
    if signature is not None:  # networkx's dispatch parameters are noise in a task
        signature = re.sub(r"(, )?(\*, )?backend=None, \*\*\w+", "", signature)
    kind = "class" if inspect.isclass(obj) else "function"
    signature = None if signature == "()" else signature
    return {
        "module": module,
        "name": name,
        "kind": kind,
        "signature": signature,
        "summary": summary,
    }


def _summary(doc: str | None) -> str | None:
    """The first prose paragraph of a docstring (a leading call-signature line skipped)."""
    paragraphs = [" ".join(p.split()) for p in (doc or "").strip().split("\n\n")]
    paragraphs = [p for p in paragraphs if p and not re.fullmatch(r"[\w.]+\(.*\)( -> .+)?", p)]
    if not paragraphs:
        return None
    text = re.sub(r"\s*\[\d+\]_", "", paragraphs[0])  # reST citation markers
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # reST roles: :class:`Mock` -> `Mock`
    if len(text) > MAX_SUMMARY_CHARS:
        end = text.find(". ")
        text = text[: end + 1] if 0 < end < MAX_SUMMARY_CHARS else ""
    if len(text) < 20 or " " not in text or "deprecated" in text.lower():
        return None
    return text.replace('"', "'")  # templates quote the summary with double quotes


def _topic_entries() -> list[dict[str, Any]]:
    from pydoc_data.topics import topics

    entries, titles = [], set()
    for key in sorted(topics):
        title = topics[key].strip().splitlines()[0].strip()  # e.g. 'The "with" statement'
        if title in titles:
            continue
        titles.add(title)
        title = re.sub(r'"[^"]*"|\b[A-Z][a-z]+\b', _lower_word, title)
        entry = {"module": "pydoc_data.topics", "name": key, "kind": "topic", "title": title}
        entries.append({"stream": "stdlib-topic", "source": "stdlib-doc", **entry})
    return entries


def _lower_word(match: re.Match[str]) -> str:
    word = match.group(0)
    return word if word.startswith('"') or word == "Python" else word.lower()


def _networkx_entries(seen: set[tuple[str, str]], versions: dict[str, str]) -> list[dict[str, Any]]:
    nx = importlib.import_module("networkx")
    versions["networkx"] = nx.__version__
    root = Path(inspect.getfile(nx)).parent.parent
    entries = []
    for name in sorted(n for n in dir(nx) if n[0] != "_"):
        obj = getattr(nx, name)
        module = getattr(obj, "__module__", None) or ""
        if inspect.isclass(obj) or not module.startswith("networkx.algorithms"):
            continue
        entry = _api_entry(module, name, obj, seen)
        file = sys.modules[module].__file__
        if entry is not None and file is not None:
            source = f"package:networkx/{Path(file).relative_to(root).as_posix()}"
            entries.append({"stream": "networkx", "source": source, **entry})
    return entries


if __name__ == "__main__":
    modules = json.loads(SNAPSHOT.read_text(encoding="utf-8"))["stdlib_modules"]
    written = write_snapshot(snapshot_api_docs(modules))
    sys.stdout.write(f"wrote {written}\n")
