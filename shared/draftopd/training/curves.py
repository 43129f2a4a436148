"""Training plots from metrics.jsonl: one run's curve (held-out tau and loss), and the SFT-vs-OPD
comparison (docs/draft_opd.md, the plateau figure: held-out tau against optimizer steps and
against training seconds, one line per run). matplotlib is imported only when plotting."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from draftopd.training.run import read_metrics

CURVE_AXES = ("step", "elapsed_s")


def plot_training_curve(metrics_path: str | Path, png_path: str | Path, *, x: str = "step") -> Path:
    """Held-out tau (left axis) and training loss (right axis) against ``x`` as a PNG.

    ``x`` is ``step`` or ``elapsed_s`` (optimizer-step seconds): docs/draft_opd.md reports tau
    against both. Needs matplotlib (imported here; ImportError if it is not installed).
    """
    if x not in CURVE_AXES:
        raise ValueError(f"x axis {x!r} not supported; choose one of {CURVE_AXES}")
    lines = read_metrics(metrics_path)
    tau = [(r[x], r["tau"]) for r in lines if r.get("tau") is not None and r.get(x) is not None]
    loss = [(r[x], r["loss"]) for r in lines if r.get("loss") is not None and r.get(x) is not None]
    if not tau and not loss:
        raise ValueError(f"{metrics_path} has no tau or loss values to plot")
    from matplotlib.figure import Figure  # optional dependency: only this function needs it

    figure = Figure(figsize=(7, 4), layout="constrained")
    left = figure.add_subplot()
    left.set_xlabel("optimizer step" if x == "step" else "training seconds")
    left.set_ylabel("held-out tau (tokens per cycle)", color="tab:blue")
    if tau:
        left.plot(*zip(*tau, strict=True), marker="o", color="tab:blue", label="tau")
    right = left.twinx()
    right.set_ylabel("training loss", color="tab:orange")
    if loss:
        right.plot(*zip(*loss, strict=True), color="tab:orange", alpha=0.7, label="loss")
    left.set_zorder(right.get_zorder() + 1)  # tau drawn over the (denser) loss line
    left.patch.set_visible(False)
    left.set_title(f"SFT: {Path(metrics_path).parent.name or Path(metrics_path).name}")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out


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


__all__ = ["CURVE_AXES", "plot_comparison", "plot_training_curve", "tau_points"]
