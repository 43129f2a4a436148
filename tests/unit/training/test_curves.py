"""The plateau figure's seed bands (docs/draft_opd.md): mean and 95% t-interval over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from draftopd.training.curves import plateau_report, seed_band


def test_one_seed_has_no_band() -> None:
    band = seed_band([[(0, 1.2), (10, 1.3)]])
    assert band.mean == [1.2, 1.3] and band.half == [0.0, 0.0] and band.seeds == 1


def test_three_seeds_give_the_t_interval_on_the_points_all_reached() -> None:
    band = seed_band([[(0, 1.0), (10, 1.2)], [(0, 1.0), (10, 1.4)], [(0, 1.0), (10, 1.6), (20, 9)]])
    assert band.x == [0, 10]  # step 20 only one seed reached: not drawn
    assert band.mean == pytest.approx([1.0, 1.4])
    half = stats.t.ppf(0.975, 2) * 0.2 / 3**0.5  # sd of 1.2, 1.4, 1.6 is 0.2
    assert band.half == pytest.approx([0.0, half])


def test_seconds_are_paired_by_index_and_averaged() -> None:
    band = seed_band([[(0.0, 1.0), (100.0, 1.1)], [(0.0, 1.0), (120.0, 1.3)]])
    assert band.x == [0.0, 110.0]


def test_a_seed_without_points_is_refused() -> None:
    with pytest.raises(ValueError, match="every seed"):
        seed_band([[(0, 1.0)], []])


def test_the_plateau_rule_can_read_tau_from_a_train_tau_file(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": s, "lr": 1e-3, "tau": 1.0 + s / 100}) + "\n" for s in range(101)
        )
    )
    taus = tmp_path / "tau_eval.jsonl"
    taus.write_text("".join(json.dumps({"step": s, "tau": 1.5}) + "\n" for s in (0, 50, 100)))
    assert not plateau_report(metrics).reached  # held-out tau rises 1.75 -> 2.0
    assert plateau_report(metrics, taus_path=taus).reached  # MT-Bench tau is flat
