"""The SFT-vs-OPD comparison plot (DRAFT_OPD.md, "the paper's plateau figure"): held-out tau
against optimizer steps and against training seconds, one line per run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from draftopd.training.pipeline import read_metrics


def tau_points(metrics_path: str | Path, x: str) -> list[tuple[float, float]]:
    """(x, tau) at every evaluated step of a run's metrics.jsonl."""
    return [
        (float(r[x]), float(r["tau"]))
        for r in read_metrics(metrics_path)
        if r.get("tau") is not None and r.get(x) is not None
    ]


def plot_comparison(runs: Sequence[tuple[str, str | Path]], png_path: str | Path) -> Path:
    """Two panels, tau against step and against seconds, for ``runs`` = [(label, metrics)]."""
    if not runs:
        raise ValueError("give at least one run (LABEL=METRICS_JSONL)")
    series = {label: (tau_points(p, "step"), tau_points(p, "elapsed_s")) for label, p in runs}
    empty = [label for label, (steps, _) in series.items() if not steps]
    if empty:
        raise ValueError(f"no tau values in the metrics of {empty}")
    from matplotlib.figure import Figure  # optional dependency: only this function needs it

    figure = Figure(figsize=(10, 4), layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for label, (steps, seconds) in series.items():
        by_step.plot(*zip(*steps, strict=True), marker="o", label=label)
        if seconds:
            by_time.plot(*zip(*seconds, strict=True), marker="o", label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training seconds")
    by_step.set_ylabel("tau (tokens per cycle)")
    by_step.legend()
    by_step.grid(alpha=0.3)
    by_time.grid(alpha=0.3)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out


__all__ = ["plot_comparison", "tau_points"]
