"""Self-instruct prompts from the tiny target: deterministic, resumable, filtered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from draftopd.prompts import load_prompts
from draftopd.training.data.corpus import BenchmarkFilter
from draftopd.training.data.self_instruct import query_prefix, self_instruct

SETTINGS: dict[str, Any] = {"batch_size": 8, "max_new_tokens": 64, "min_chars": 4}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_prefix_is_the_template_up_to_the_user_text(tiny_target: Any) -> None:
    prefix = query_prefix(tiny_target)
    rendered = tiny_target.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False
    )
    text = tiny_target.tokenizer.decode(prefix)
    assert rendered.startswith(text) and rendered[len(text) :].startswith("hello there")


def test_prompts_are_seeded_resumable_and_readable(tiny_target: Any, tmp_path: Path) -> None:
    none = BenchmarkFilter.from_texts(["an unrelated benchmark turn"])
    whole = tmp_path / "whole.jsonl"
    stats = self_instruct(tiny_target, whole, count=12, benchmark=none, **SETTINGS)
    assert stats.kept == stats.added == 12 and stats.rejected["unfinished"] > 0
    resumed = tmp_path / "resumed.jsonl"
    self_instruct(tiny_target, resumed, count=5, benchmark=none, **SETTINGS)
    again = self_instruct(tiny_target, resumed, count=12, benchmark=none, **SETTINGS)
    assert again.added == 7
    assert resumed.read_text() == whole.read_text()  # an interrupted run ends the same
    records = _lines(whole)
    assert len({r["id"] for r in records}) == 12
    assert all(r["category"] == "self-instruct" and r["provenance"]["seed"] == 0 for r in records)
    assert [p.text for p in load_prompts(str(whole))] == [r["prompt"] for r in records]
    other = tmp_path / "other.jsonl"
    self_instruct(tiny_target, other, count=12, benchmark=none, seed=1, **SETTINGS)
    assert other.read_text() != whole.read_text()
    with pytest.raises(ValueError, match="other settings"):
        self_instruct(tiny_target, whole, count=13, benchmark=none, seed=1, **SETTINGS)


def test_benchmark_overlaps_are_dropped(tiny_target: Any, tmp_path: Path) -> None:
    none = BenchmarkFilter.from_texts(["an unrelated benchmark turn"])
    self_instruct(tiny_target, tmp_path / "a.jsonl", count=6, benchmark=none, **SETTINGS)
    first = _lines(tmp_path / "a.jsonl")
    banned = BenchmarkFilter.from_texts([first[2]["prompt"]])
    stats = self_instruct(tiny_target, tmp_path / "b.jsonl", count=6, benchmark=banned, **SETTINGS)
    kept = [r["prompt"] for r in _lines(tmp_path / "b.jsonl")]
    assert first[2]["prompt"] not in kept and stats.rejected["mtbench-exact"] == 1
    assert kept[:2] == [r["prompt"] for r in first[:2]]


def test_bad_settings_are_refused(tiny_target: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="temperature"):
        self_instruct(tiny_target, tmp_path / "x.jsonl", count=2, temperature=0.0)
    with pytest.raises(ValueError, match="positive"):
        self_instruct(tiny_target, tmp_path / "x.jsonl", count=0)


def test_a_target_without_the_lean_step_samples_with_generate(
    tiny_target_dir: Path, tmp_path: Path
) -> None:
    from draftopd.models.target import load_target

    hf = load_target(str(tiny_target_dir), step="hf")
    none = BenchmarkFilter.from_texts(["an unrelated benchmark turn"])
    first = self_instruct(hf, tmp_path / "a.jsonl", count=4, benchmark=none, **SETTINGS)
    self_instruct(hf, tmp_path / "b.jsonl", count=4, benchmark=none, **SETTINGS)
    assert (
        first.kept == 4 and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    )
