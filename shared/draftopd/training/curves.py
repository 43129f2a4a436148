"""Training plots from metrics.jsonl: one run's curve (held-out tau and loss), and the SFT-vs-OPD
comparison (docs/draft_opd.md, the plateau figure: held-out tau against optimizer steps and
against training seconds, one line per run). matplotlib is imported only when plotting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from draftopd.training.run import read_metrics

CURVE_AXES = ("step", "elapsed_s")


@dataclass(frozen=True)
class PlateauReport:
    """Did a run end at a plateau? Held-out tau over its last quarter (from ``start_step`` on)
    moves by less than ``tolerance`` of the tau there, while the LR stays above ``lr_floor`` of
    its peak (so the plateau is not the LR decaying to zero)."""

    start_step: int  # the eval step at (or just before) 75% of the run
    tau_start: float
    tau_end: float
    max_change: float  # max |tau - tau_start| / tau_start over the last quarter's evals
    min_lr_ratio: float  # smallest LR in the last quarter / peak LR
    tolerance: float
    lr_floor: float

    @property
    def reached(self) -> bool:
        return self.max_change < self.tolerance and self.min_lr_ratio > self.lr_floor

    def describe(self) -> str:
        verdict = "plateau reached" if self.reached else "no plateau"
        return (
            f"{verdict}: held-out tau {self.tau_start:.3f} at step {self.start_step} -> "
            f"{self.tau_end:.3f} at the end, largest change over the last quarter "
            f"{100 * self.max_change:.2f}% (limit {100 * self.tolerance:.0f}%), lowest LR "
            f"{100 * self.min_lr_ratio:.1f}% of the peak (limit {100 * self.lr_floor:.0f}%)"
        )


def plateau_report(
    metrics_path: str | Path,
    *,
    tolerance: float = 0.02,
    lr_floor: float = 0.10,
    taus_path: str | Path | None = None,
) -> PlateauReport:
    """The plateau rule on a run's metrics.jsonl; ``taus_path`` takes the tau evaluations from
    another file with step and tau (``draftopd train tau``'s RUN/tau_eval.jsonl: MT-Bench tau
    instead of held-out tau), the LR still from the run's metrics."""
    lines = read_metrics(metrics_path)
    tau_lines = lines if taus_path is None else read_metrics(taus_path)
    evals = [(int(r["step"]), float(r["tau"])) for r in tau_lines if r.get("tau") is not None]
    lrs = [(int(r["step"]), float(r["lr"])) for r in lines if r.get("lr") is not None]
    if len(evals) < 2 or not lrs:
        raise ValueError(f"{metrics_path} needs at least two tau evaluations and an LR")
    last = max(step for step, _ in lrs)
    quarter = 0.75 * last
    start_step, tau_start = max((e for e in evals if e[0] <= quarter), default=evals[0])
    tail = [tau for step, tau in evals if step >= start_step]
    peak = max(lr for _, lr in lrs)
    return PlateauReport(
        start_step=start_step,
        tau_start=tau_start,
        tau_end=tail[-1],
        max_change=max(abs(t - tau_start) for t in tail) / tau_start,
        min_lr_ratio=min(lr for step, lr in lrs if step >= quarter) / peak,
        tolerance=tolerance,
        lr_floor=lr_floor,
    )


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-batch losses are noisy)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curve(
    metrics_path: str | Path, png_path: str | Path, *, smooth: int = 20
) -> Path:
    """A 3 x 2 grid: held-out tau, loss per TTT step and top-1 agreement per TTT step (rows),
    against optimizer steps and against training seconds (columns). Losses and agreement are
    moving averages over ``smooth`` steps. Needs matplotlib (imported here)."""
    lines = read_metrics(metrics_path)
    tau = [r for r in lines if r.get("tau") is not None]
    trained = [r for r in lines if r.get("step_loss")]
    if not tau and not trained:
        raise ValueError(f"{metrics_path} has no tau or loss values to plot")
    from matplotlib.figure import Figure  # optional dependency: only this function needs it

    figure = Figure(figsize=(11, 10), layout="constrained")
    axes = figure.subplots(3, 2, sharex="col")
    depth = max((len(r["step_loss"]) for r in trained), default=0)
    for col, x in enumerate(CURVE_AXES):
        if tau:
            axes[0][col].plot([r[x] for r in tau], [r["tau"] for r in tau], marker="o")
        for j in range(depth):
            rows = [r for r in trained if len(r["step_loss"]) > j]
            xs = [r[x] for r in rows]
            axes[1][col].plot(xs, _smooth([r["step_loss"][j] for r in rows], smooth), label=f"{j}")
            axes[2][col].plot(xs, _smooth([r["step_acc"][j] for r in rows], smooth), label=f"{j}")
        axes[2][col].set_xlabel("optimizer step" if x == "step" else "training seconds")
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out tau")
    axes[1][0].set_ylabel(f"soft CE per TTT step (avg {smooth})")
    axes[2][0].set_ylabel(f"top-1 agreement per TTT step (avg {smooth})")
    if depth:
        axes[1][1].legend(title="TTT step", fontsize="small", ncols=2)
    figure.suptitle(f"SFT: {Path(metrics_path).parent.name or Path(metrics_path).name}")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=110)
    return out


def tau_points(metrics_path: str | Path, x: str) -> list[tuple[float, float]]:
    """(x, tau) at every evaluated step of a run's metrics.jsonl."""
    return [
        (float(r[x]), float(r["tau"]))
        for r in read_metrics(metrics_path)
        if r.get("tau") is not None and r.get(x) is not None
    ]


@dataclass(frozen=True)
class SeedBand:
    """tau of one arm at each x over its seeds: mean and the 95% t-interval half-width (0 with
    one seed). Only the x values every seed reached are kept, so the band never mixes seeds."""

    x: list[float]
    mean: list[float]
    half: list[float]
    seeds: int


def seed_band(curves: Sequence[Sequence[tuple[float, float]]]) -> SeedBand:
    """``curves`` = one [(x, tau)] list per seed. Seconds differ between seeds, so for x =
    seconds each seed's point i is paired with the others' point i (their x is averaged)."""
    from scipy import stats

    n = len(curves)
    if n == 0 or any(not c for c in curves):
        raise ValueError("every seed needs at least one tau point")
    length = min(len(c) for c in curves)
    xs, means, halves = [], [], []
    for i in range(length):
        taus = [c[i][1] for c in curves]
        mean = sum(taus) / n
        half = 0.0
        if n > 1:
            sd = (sum((t - mean) ** 2 for t in taus) / (n - 1)) ** 0.5
            half = float(stats.t.ppf(0.975, n - 1)) * sd / n**0.5
        xs.append(sum(c[i][0] for c in curves) / n)
        means.append(mean)
        halves.append(half)
    return SeedBand(xs, means, halves, n)


def plot_comparison(
    runs: Sequence[tuple[str, str | Path]],
    png_path: str | Path,
    *,
    base: tuple[str, str | Path] | None = None,
    title: str | None = None,
) -> Path:
    """The plateau figure: tau against optimizer steps and against training seconds, for ``runs``
    = [(label, metrics or tau_eval jsonl)]. Runs sharing a label are seeds of one arm: drawn as
    the mean with a 95% CI band. ``base`` is the run the arms branched from; it is drawn before
    the branch point (its steps and seconds shifted so that its end is 0), so the SFT plateau and
    what each arm does after it are on one axis."""
    if not runs:
        raise ValueError("give at least one run (LABEL=METRICS_JSONL)")
    grouped: dict[str, list[str | Path]] = {}
    for label, path in runs:
        grouped.setdefault(label, []).append(path)
    bands: dict[str, tuple[SeedBand, SeedBand | None]] = {}
    for label, paths in grouped.items():
        steps = [tau_points(p, "step") for p in paths]
        if any(not s for s in steps):
            raise ValueError(f"no tau values in the metrics of {[label]}")
        seconds = [tau_points(p, "elapsed_s") for p in paths]
        by_time = seed_band(seconds) if all(seconds) else None
        bands[label] = (seed_band(steps), by_time)
    from matplotlib.figure import Figure  # optional dependency: only this function needs it

    figure = Figure(figsize=(10, 4), layout="constrained")
    by_step, by_time_axis = figure.subplots(1, 2, sharey=True)
    if base is not None:
        label, path = base
        for axis, x in ((by_step, "step"), (by_time_axis, "elapsed_s")):
            points = tau_points(path, x)
            if points:
                end = points[-1][0]
                shifted = [p[0] - end for p in points]
                name = f"{label} (before the branch)"
                axis.plot(shifted, [p[1] for p in points], marker="o", color="grey", label=name)
                axis.axvline(0, color="grey", linestyle=":", linewidth=1)
    for label, (step_band, time_band) in bands.items():
        name = f"{label} ({step_band.seeds} seeds)" if step_band.seeds > 1 else label
        for axis, band in ((by_step, step_band), (by_time_axis, time_band)):
            if band is None:
                continue
            line = axis.plot(band.x, band.mean, marker="o", label=name)[0]
            if band.seeds > 1:
                low = [m - h for m, h in zip(band.mean, band.half, strict=True)]
                high = [m + h for m, h in zip(band.mean, band.half, strict=True)]
                axis.fill_between(band.x, low, high, color=line.get_color(), alpha=0.2)
    by_step.set_xlabel("optimizer step" + (" (0 = branch point)" if base else ""))
    by_time_axis.set_xlabel("training seconds" + (" (0 = branch point)" if base else ""))
    by_step.set_ylabel("tau (tokens per cycle)")
    by_step.legend(fontsize="small")
    by_step.grid(alpha=0.3)
    by_time_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)
    return out


__all__ = [
    "CURVE_AXES",
    "PlateauReport",
    "SeedBand",
    "plateau_report",
    "plot_comparison",
    "plot_training_curve",
    "seed_band",
    "tau_points",
]
