"""``draftopd compare``: the paired per-prompt statistics, checked against hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftopd.cli import main
from draftopd.paired import paired_comparison, report_taus


def _report(path: Path, taus: dict[str, float]) -> Path:
    rows = [{"id": k, "spec": {"tau": v}, "baseline": {}} for k, v in taus.items()]
    path.write_text(json.dumps({"tau": 0, "per_prompt": rows}))
    return path


def test_statistics_of_a_hand_made_example() -> None:
    a = {"p1": 1.0, "p2": 1.5, "p3": 2.0, "p4": 1.2, "p5": 1.4}
    b = {"p1": 1.2, "p2": 1.5, "p3": 2.3, "p4": 1.1, "p5": 1.8}
    # diffs 0.2, 0, 0.3, -0.1, 0.4: mean 0.16, sd sqrt(0.172 / 4), t(0.975, 4) = 2.776445
    result = paired_comparison(a, b)
    assert result.n == 5 and (result.wins, result.losses, result.ties) == (3, 1, 1)
    assert result.mean_diff == pytest.approx(0.16)
    half = 2.776445 * (0.172 / 4) ** 0.5 / 5**0.5
    assert (result.ci_low, result.ci_high) == pytest.approx((0.16 - half, 0.16 + half), abs=1e-5)
    assert result.sign_p == pytest.approx(5 / 8)  # 3 of 4 decided: 2 * P(X >= 3), X ~ B(4, 1/2)
    assert result.ratio == pytest.approx(7.9 / 7.1)


def test_a_clear_win_has_a_ci_above_zero_and_a_small_p() -> None:
    a = {f"p{i}": 1.0 + 0.01 * i for i in range(20)}
    b = {k: v + 0.2 + 0.01 * (i % 3) for i, (k, v) in enumerate(a.items())}
    result = paired_comparison(a, b)
    assert result.ci_low > 0 and result.sign_p == pytest.approx(2 / 2**20)


def test_reports_on_other_prompts_are_refused() -> None:
    with pytest.raises(ValueError, match="different prompts"):
        paired_comparison({"p1": 1.0, "p2": 1.0}, {"p1": 1.0, "p3": 1.0})


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _report(tmp_path / "a.json", {"1": 1.0, "2": 2.0, "3": 1.5})
    b = _report(tmp_path / "b.json", {"1": 1.5, "2": 2.0, "3": 2.0})
    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--labels", "sft,opd", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "tau sft 1.500 | opd 1.833" in text and "wins 2, losses 0, ties 1" in text
    saved = json.loads(out_json.read_text())
    assert saved["a"] == "sft" and saved["mean_diff"] == pytest.approx(1 / 3)
    assert report_taus(b) == {"1": 1.5, "2": 2.0, "3": 2.0}
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(tmp_path / "missing.json")])


def test_tau_eval_run_files_compare_by_checkpoint(tmp_path: Path) -> None:
    """`draftopd train tau` writes RUN/tau_eval.jsonl: the last line by default, @N picks a step."""
    lines = [
        {"step": 0, "tau": 1.2, "per_prompt_tau": [1.0, 1.5]},
        {"step": 40, "tau": 1.4, "per_prompt_tau": [1.25, 1.75]},
    ]
    run = tmp_path / "tau_eval.jsonl"
    run.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert report_taus(run) == {"0": 1.25, "1": 1.75}
    assert report_taus(f"{run}@0") == {"0": 1.0, "1": 1.5}
    with pytest.raises(ValueError, match="at step 7"):
        report_taus(f"{run}@7")
    assert main(["compare", f"{run}@0", str(run)]) == 0
