"""Print the ablation table (markdown) from runs/abl-<row>/metrics.jsonl.

    .venv/bin/python docs/experiments/ablation_table.py [ROW...]   # default: every runs/abl-*

Per row: optimizer steps and seconds reached, the last held-out tau (K = 4 for EAGLE-3 rows,
K = B - 1 for DFlash rows) and acceptance by position at that evaluation, and the first-slot
top-1 agreement of the last training step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(path: Path) -> dict[str, object]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [line for line in lines if line.get("tau") is not None]
    steps = [line for line in lines if line.get("step_acc")]
    last = evals[-1] if evals else {}
    return {
        "steps": max((line["step"] for line in lines), default=0),
        "seconds": max((line.get("elapsed_s", 0.0) for line in lines), default=0.0),
        "tau": last.get("tau"),
        "acceptance": last.get("acceptance"),
        "acc1": steps[-1]["step_acc"][0] if steps else None,
    }


def main(rows: list[str]) -> None:
    paths = (
        [Path(f"runs/abl-{row}/metrics.jsonl") for row in rows]
        if rows
        else sorted(Path("runs").glob("abl-*/metrics.jsonl"))
    )
    head = ("row", "optimizer steps", "optimizer s", "held-out τ", "acceptance by position")
    print("| " + " | ".join((*head, "train top-1 (slot 1)")) + " |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        if not path.is_file():
            continue
        s = summary(path)
        tau = f"{s['tau']:.3f}" if isinstance(s["tau"], float) else "—"
        shown = list(s["acceptance"] or [])[:4]  # type: ignore[call-overload]
        acc = " / ".join(f"{a:.2f}" for a in shown) if shown else "—"
        if s["acceptance"] and len(s["acceptance"]) > 4:  # type: ignore[arg-type]
            acc += " / …"
        acc1 = f"{s['acc1']:.2f}" if isinstance(s["acc1"], float) else "—"
        name = path.parent.name.removeprefix("abl-")
        print(f"| {name} | {s['steps']} | {s['seconds']:.0f} | {tau} | {acc} | {acc1} |")


if __name__ == "__main__":
    main(sys.argv[1:])
