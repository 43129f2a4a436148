"""The cost table (``draftopd bench --costs``) on the tiny target: its cells, ratios and text."""

from __future__ import annotations

from typing import Any

import pytest

from draftopd.bench_config import BenchConfig
from draftopd.costs import CYCLE_KS, DRAFT_LENGTHS, CostPlan, format_costs, measure_costs


def test_cost_table_cells_and_ratios(tiny_target: Any, tiny_drafter: Any) -> None:
    plan = CostPlan(steps=("hf", "lean"), contexts=(12, 30), blocks=(1, 2, 8), repeats=2)
    table = measure_costs(tiny_target, tiny_drafter, plan)
    assert table["weights_mb"] > 0 and table["weight_stream_ms"] > 0
    assert set(table["contexts"]) == {"12", "30"}
    for entry in table["contexts"].values():
        for step in ("hf", "lean"):
            cells, ratios = entry["target_ms"][step], entry["verify_ratio"][step]
            assert set(cells) == {"1", "2", "8"} and all(ms > 0 for ms in cells.values())
            assert ratios["1"] == 1.0
            assert ratios["8"] == pytest.approx(cells["8"] / cells["1"])
        assert set(entry["draft_ms"]) == {str(k) for k in DRAFT_LENGTHS}
        assert set(entry["cycle_ms"]) == {str(k) for k in CYCLE_KS}
        for k, ms in entry["cycle_ms"].items():
            assert entry["cycle_ratio"][k] == pytest.approx(ms / entry["cycle_plain_ms"])
    text = format_costs(table)
    assert "memory floor" in text and "context 30 tokens" in text and "whole cycle" in text


def test_bench_config_checks_the_step_choices() -> None:
    assert BenchConfig(step="hf", kernel="torch", draft_weights="bfloat16").step == "hf"
    for field, value in (("step", "fast"), ("kernel", "cuda"), ("draft_weights", "int4")):
        with pytest.raises(ValueError, match=field):
            BenchConfig(**{field: value})


def test_a_block_drafter_is_timed_at_its_whole_block(tiny_target: Any) -> None:
    """A DFlash drafter of block 4 drafts at most 3: the table times k up to 3 (its whole block),
    names the family, and gives the drafting cost as a share of a plain step."""
    from draftopd.models.checkpoint import random_drafter_for

    drafter = random_drafter_for(tiny_target, seed=0, architecture="dflash", block_size=4)
    plan = CostPlan(steps=("lean",), contexts=(12,), blocks=(1, 4), repeats=2)
    table = measure_costs(tiny_target, drafter, plan)
    entry = table["contexts"]["12"]
    assert table["drafter"] == "dflash"
    assert set(entry["draft_ms"]) == {"1", "3"} and set(entry["cycle_ms"]) == {"2", "3"}
    assert entry["draft_ratio"]["3"] == pytest.approx(
        entry["draft_ms"]["3"] / entry["cycle_plain_ms"]
    )
    assert "DFlash drafting alone" in format_costs(table)
