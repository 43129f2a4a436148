"""The safetensors cache of a GGUF target when several services convert it at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from draftopd.models.target import publish_directory


def _converted(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(text)
    return path


def test_the_first_copy_wins_and_a_later_one_is_dropped(tmp_path: Path) -> None:
    out = tmp_path / "targets" / "model-abc"
    publish_directory(_converted(tmp_path / "targets" / "model-abc.tmp1", "first"), out)
    assert (out / "config.json").read_text() == "first"
    late = _converted(tmp_path / "targets" / "model-abc.tmp2", "second")
    publish_directory(late, out)  # the race `draftopd up` met on a fresh cache
    assert (out / "config.json").read_text() == "first" and not late.exists()


def test_an_incomplete_destination_is_still_an_error(tmp_path: Path) -> None:
    out = tmp_path / "model-abc"
    (out / "partial").mkdir(parents=True)
    (out / "partial" / "x").write_text("x")
    with pytest.raises(OSError):
        publish_directory(_converted(tmp_path / "model-abc.tmp1", "c"), out)
