"""Issue 16's report from the runs of opd_plateau.sh: the table (arm x seed: MT-Bench tau at the
branch point and at the end, acceptance by position, seconds, target tokens), the mechanism
figures of the Draft-OPD runs (replay parity, where the anchors fall, how the loss normaliser
splits between the streams), the paired per-prompt comparisons on all 80 MT-Bench questions and
the plateau figure.

    .venv/bin/python docs/experiments/opd_plateau_report.py runs/plateau [--png docs/img/x.png]
        [--registry-url http://127.0.0.1:8003 --token T --drafter smollm2-plateau]
        [--family dflash-b8 --k 7]   # a second family: base OUT/dflash-b8, arms dflash-b8-opd-s0...

With --registry-url, the base's and every arm's final checkpoint become versions of --drafter
(the base first, each arm's parent), each with its MT-Bench tau posted as a metric, so the
registry holds the comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from draftopd.paired import format_comparison, paired_comparison, report_taus
from draftopd.training.curves import plateau_report, plot_comparison
from draftopd.training.run import read_metrics

RUN = re.compile(r"^(?P<arm>(opd|sft)[a-z0-9.-]*)-s(?P<seed>\d+)$")  # opd-lb0.1-s0 too


def arm_pattern(family: str) -> re.Pattern[str]:
    """Arm directory names of one family: unprefixed for EAGLE-3, FAMILY-opd-s0 etc. else."""
    return re.compile(rf"^{re.escape(family + '-')}{RUN.pattern[1:]}") if family else RUN


def tau_lines(run: Path) -> list[dict]:
    path = run / "tau_eval.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def arm_row(run: Path) -> dict:
    metrics = [r for r in read_metrics(run / "metrics.jsonl") if "step" in r and "loss" in r]
    taus = tau_lines(run)
    row: dict = {
        "run": run.name,
        "steps": taus[-1]["step"],
        "tau_start": taus[0]["tau"],
        "tau_end": taus[-1]["tau"],
        "tau_curve": [(t["step"], t["tau"]) for t in taus],
        "acceptance_start": taus[0]["acceptance_by_position"],
        "acceptance_end": taus[-1]["acceptance_by_position"],
        "seconds": taus[-1]["elapsed_s"],
    }
    manifest = run / "data" / "manifest.json"
    if "rollout_tokens" in (metrics[0] if metrics else {}):
        row["target_tokens"] = sum(r["rollout_tokens"] for r in metrics)
        row["rollout_s"] = sum(r["rollout_s"] for r in metrics)
        row["parity_min"] = min(
            min(r[k] for r in metrics if r.get(k) is not None)
            for k in ("parity_accepted", "parity_rejected")
        )
        norm_a = sum(r.get("norm_a") or 0 for r in metrics)
        norm_b = sum(r.get("norm_b") or 0 for r in metrics)
        row["stream_a_share"] = norm_a / (norm_a + norm_b) if norm_a + norm_b else None
        row["slots_a"] = sum(r["slots_a"] for r in metrics)
        row["slots_b"] = sum(r["slots_b"] for r in metrics)
        for key in ("anchor_rel_pos", "target_top1_anchor", "target_top1_response"):
            row[key] = mean_of(metrics, key)
        head, tail = metrics[:5], metrics[-5:]
        row["rollout_tau_first5"] = mean_of(head, "rollout_tau")
        row["rollout_tau_last5"] = mean_of(tail, "rollout_tau")
    elif manifest.is_file():
        data = json.loads(manifest.read_text())
        row["target_tokens"] = data["response_tokens"]
        row["data_s"] = sum(s.get("generate_s", 0.0) for s in data["shards"])
    return row


def register(args: argparse.Namespace, out: Path, rows: list[dict]) -> dict[str, int]:
    """Upload the base and each arm's final checkpoint; post each one's MT-Bench tau."""
    from draftopd.wire.registry_client import RegistryClient

    versions: dict[str, int] = {}
    with RegistryClient(args.registry_url, token=args.token) as client:
        if args.drafter not in {d["name"] for d in client.list_drafters()}:
            description = "issue 16: Draft-OPD against continued SFT from one SFT plateau"
            architecture = "dflash" if args.family.startswith("dflash") else "eagle3"
            client.create_drafter(
                args.drafter,
                target_model="smollm2",
                architecture=architecture,
                description=description,
            )
        base_dir = out / (args.family or "base")
        base_lines = tau_lines(base_dir) if (base_dir / "tau_eval.jsonl").is_file() else []
        entries = [("base", base_lines[-1])] if base_lines else []
        entries += [(r["run"], tau_lines(out / r["run"])[-1]) for r in rows]
        for name, line in entries:
            version = client.upload_version(
                args.drafter, line["checkpoint"], parent_version=versions.get("base")
            )
            number = int(version["version"])
            versions[name] = number
            extra = {
                "run": name,
                "step": line["step"],
                "cycles": line["cycles"],
                "acceptance_by_position": line["acceptance_by_position"],
            }
            client.post_metrics(
                args.drafter,
                number,
                benchmark=f"mt_bench_80_greedy_k{args.k}",
                tau=line["tau"],
                hardware="2-vCPU EPYC, CPU",
                extra=extra,
            )
            print(f"registered {name} as {args.drafter} v{number} (tau {line['tau']:.4f})")
    return versions


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the experiment directory (runs/plateau)")
    parser.add_argument("--png", type=Path, help="plateau figure (default OUT/plateau.png)")
    parser.add_argument("--json", type=Path, help="report JSON (default OUT/report.json)")
    parser.add_argument("--registry-url", help="upload the checkpoints and their tau here")
    parser.add_argument("--token", help="the registry's bearer token")
    parser.add_argument("--drafter", default="smollm2-plateau", help="registry drafter name")
    parser.add_argument("--family", default="", help="a second family's base run (dflash-b8)")
    parser.add_argument("--k", type=int, default=4, help="drafts per cycle of the tau files")
    args = parser.parse_args()
    out: Path = args.out
    report: dict = {"family": args.family or "eagle3", "k": args.k}
    run_re = arm_pattern(args.family)
    base_dir = out / (args.family or "base")

    base_tau = base_dir / "tau_eval.jsonl"
    if base_tau.is_file():
        lines = tau_lines(base_dir)
        report["base"] = [(x["step"], x["tau"]) for x in lines]
        print(f"## base SFT: MT-Bench tau (80 questions, K = {args.k}) per checkpoint")
        print(" ".join(f"{s}:{t:.3f}" for s, t in report["base"]))
        plateau = plateau_report(base_dir / "metrics.jsonl", taus_path=base_tau)
        report["base_plateau"] = plateau.describe()
        print("MT-Bench", plateau.describe())
        evals = [r for r in read_metrics(base_dir / "metrics.jsonl") if r.get("tau") is not None]
        if len(evals) >= 3:  # a run trained with --eval-every 0 has only its final one
            held = plateau_report(base_dir / "metrics.jsonl")
            report["base_heldout_plateau"] = held.describe()
            print("held-out", held.describe())

    runs = sorted(
        d for d in out.iterdir() if run_re.match(d.name) and (d / "tau_eval.jsonl").is_file()
    )
    rows = [arm_row(d) for d in runs]
    report["arms"] = rows
    print(f"\n## arms (MT-Bench 80 questions, K = {args.k})")
    print(
        "| run | steps | tau start | tau end | change | acceptance at the end | s | target tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        change = r["tau_end"] / r["tau_start"] - 1
        acc = " / ".join(f"{a:.3f}" for a in r["acceptance_end"])
        print(
            f"| {r['run']} | {r['steps']} | {r['tau_start']:.4f} | {r['tau_end']:.4f} | "
            f"{100 * change:+.2f}% | {acc} | {r['seconds']:.0f} | {r.get('target_tokens', 'n/a')} |"
        )
    opd_rows = [r for r in rows if "parity_min" in r]
    if opd_rows:
        print("\n## Draft-OPD mechanism")
        print(
            "| run | parity min | stream-A share of the normaliser | slots A / B | anchor rel. "
            "position | target top-1 at anchors / over the response | rollout tau first 5 -> "
            "last 5 steps | rollout s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in opd_rows:
            print(
                f"| {r['run']} | {r['parity_min']:.4f} | {fmt(r['stream_a_share'])} | "
                f"{r['slots_a']} / {r['slots_b']} | {fmt(r['anchor_rel_pos'])} | "
                f"{fmt(r['target_top1_anchor'])} / {fmt(r['target_top1_response'])} | "
                f"{fmt(r['rollout_tau_first5'])} -> {fmt(r['rollout_tau_last5'])} | "
                f"{r['rollout_s']:.0f} |"
            )

    # keyed by the unprefixed arm name (opd-s0, sft-s0, ...) from here on
    by_name = {d.name.removeprefix(f"{args.family}-" if args.family else ""): d for d in runs}
    comparisons = {}
    print("\n## paired per-prompt comparisons (80 questions; final checkpoints)")
    seeds = sorted({int(RUN.match(n)["seed"]) for n in by_name})
    pairs = [(f"sft-s{s}", f"opd-s{s}") for s in seeds]
    ablations = [n for n in by_name if RUN.match(n)["arm"] not in ("opd", "sft")]
    pairs += [("sft-s0", n) for n in ablations] + [("opd-s0", n) for n in ablations]
    pairs += [("opd-no-b-s0", n) for n in ablations if n != "opd-no-b-s0"]
    for a, b in pairs:
        if a in by_name and b in by_name:
            result = paired_comparison(
                report_taus(by_name[a] / "tau_eval.jsonl"),
                report_taus(by_name[b] / "tau_eval.jsonl"),
            )
            comparisons[f"{b} vs {a}"] = result.to_dict()
            print(format_comparison(result, a, b))
    pooled = {}
    for arm in ("opd", "sft"):
        names = [f"{arm}-s{s}" for s in seeds if f"{arm}-s{s}" in by_name]
        if names:
            finals = [report_taus(by_name[n] / "tau_eval.jsonl") for n in names]
            pooled[arm] = {k: statistics.fmean(f[k] for f in finals) for k in finals[0]}
    if len(pooled) == 2 and len(seeds) > 1:
        result = paired_comparison(pooled["sft"], pooled["opd"])
        comparisons["opd vs sft, per-prompt mean over seeds"] = result.to_dict()
        print("mean over seeds:", format_comparison(result, "sft", "opd"))
    report["comparisons"] = comparisons

    png = args.png or out / "plateau.png"
    arms = [(RUN.match(n)["arm"], by_name[n] / "tau_eval.jsonl") for n in by_name]
    if arms:
        base = ("base SFT", base_tau) if base_tau.is_file() else None
        family = args.family or "EAGLE-3"
        title = f"{family} on SmolLM2: MT-Bench tau (80 q, K={args.k})"
        plot_comparison(arms, png, base=base, title=title)
        print(f"\nwrote {png}")
    if args.registry_url:
        report["registry"] = register(args, out, rows)
    path = args.json or out / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
