"""Paired per-prompt comparison of two bench reports (``draftopd compare``).

Two drafters benchmarked on the same prompts give two τ per prompt. The comparison is on the
per-prompt differences d_i = τ_B,i − τ_A,i (B the candidate, A the baseline):

- the mean difference with a two-sided 95% confidence interval from Student's t with n − 1
  degrees of freedom (``mean ± t * sd / sqrt(n)``);
- the exact two-sided sign test: under "no difference" a non-zero d_i is positive with
  probability 1/2; ties (d_i = 0) are dropped, as usual;
- the ratio of the mean τ (B / A), which is what "τ ≥ 1.10× continued SFT" reads.

Reports are the JSON that ``draftopd bench --json`` writes: ``per_prompt[i].spec.tau`` keyed by
``per_prompt[i].id``; prompts present in only one report are an error, not silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scipy import stats


@dataclass(frozen=True)
class PairedComparison:
    n: int  # prompts compared
    mean_a: float
    mean_b: float
    ratio: float  # mean_b / mean_a
    mean_diff: float  # mean of b - a
    ci_low: float  # 95% CI of the mean difference
    ci_high: float
    wins: int  # prompts where b > a
    losses: int  # prompts where b < a
    ties: int
    sign_p: float  # exact two-sided sign test

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(a: dict[str, float], b: dict[str, float]) -> PairedComparison:
    """Compare ``b`` against ``a`` on the same keys (at least 2)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the reports cover different prompts (only in one: {only[:5]})")
    keys = sorted(a)
    n = len(keys)
    if n < 2:
        raise ValueError("a paired comparison needs at least 2 prompts")
    diffs = [b[k] - a[k] for k in keys]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    decided = wins + losses
    sign_p = float(stats.binomtest(wins, decided, 0.5).pvalue) if decided else 1.0
    mean_a, mean_b = sum(a.values()) / n, sum(b.values()) / n
    return PairedComparison(
        n=n,
        mean_a=mean_a,
        mean_b=mean_b,
        ratio=mean_b / mean_a,
        mean_diff=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        wins=wins,
        losses=losses,
        ties=n - decided,
        sign_p=sign_p,
    )


def report_taus(path: str | Path) -> dict[str, float]:
    """{prompt id: speculative τ} of a ``draftopd bench --json`` report, or of one checkpoint of a
    ``draftopd train tau`` run file (``RUN/tau_eval.jsonl``: its last checkpoint, or the one at
    step N with ``RUN/tau_eval.jsonl@N``; prompts are keyed by their index in the evaluation)."""
    text, _, step = str(path).partition("@")
    if text.endswith(".jsonl"):
        return _tau_eval_taus(Path(text), step)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = data.get("per_prompt") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: not a bench report with per_prompt rows")
    taus: dict[str, float] = {}
    for row in rows:
        spec = row.get("spec") or {}
        if "tau" not in spec:
            raise ValueError(f"{path}: prompt {row.get('id')!r} has no speculative tau")
        taus[str(row["id"])] = float(spec["tau"])
    return taus


def _tau_eval_taus(path: Path, step: str) -> dict[str, float]:
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if step:
        lines = [x for x in lines if str(x.get("step")) == step]
    if not lines or "per_prompt_tau" not in lines[-1]:
        where = f" at step {step}" if step else ""
        raise ValueError(f"{path}: no checkpoint with per-prompt tau{where}")
    return {str(i): float(t) for i, t in enumerate(lines[-1]["per_prompt_tau"])}


def format_comparison(result: PairedComparison, label_a: str, label_b: str) -> str:
    return (
        f"{result.n} prompts | tau {label_a} {result.mean_a:.3f} | {label_b} {result.mean_b:.3f} "
        f"| ratio {result.ratio:.3f}\n"
        f"{label_b} - {label_a}: mean {result.mean_diff:+.3f}, 95% CI "
        f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}] | wins {result.wins}, losses "
        f"{result.losses}, ties {result.ties} | sign test p = {result.sign_p:.3g}"
    )


__all__ = [
    "PairedComparison",
    "format_comparison",
    "paired_comparison",
    "report_taus",
]
