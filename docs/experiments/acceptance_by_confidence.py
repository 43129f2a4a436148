"""Issue 14: where the drafter's first draft fails, by how sure the target itself is.

For each prompt set the target writes its greedy text (128 tokens, cut after the first EOS), one
target pass gives its probability of every token it wrote (its top-1 probability, since the text
is greedy), and the drafter drafts K tokens from every anchor as ``draftopd train tau`` does. The
table bins response positions by that probability and gives, per bin, the share of positions and
the drafter's first-draft agreement with the target (slot 1), and slot 2's agreement where slot 1
was right. It separates "the target's text is hard to predict here" from "the drafter is weak".

    PYTHONPATH=. .venv/bin/python docs/experiments/acceptance_by_confidence.py \
        --drafter runs/eagle3-recipe/checkpoints/step-00001800 --json runs/confidence.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Sequence

import torch

from draftopd.bench import load_drafter_ref
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel, load_target
from draftopd.prompts import Prompt, load_prompts, render_prompt
from draftopd.training.data.corpus import load_training_prompts
from draftopd.training.opd import greedy_rollouts as g

EDGES = (0.0, 0.3, 0.5, 0.7, 0.9, 1.01)


def positions(
    target: TargetModel, drafter: Drafter, prompts: Sequence[Prompt], *, k: int, n: int
) -> list[tuple[float, bool, bool | None]]:
    """(target probability, slot 1 right, slot 2 right or None) per response position."""
    ids_list = [render_prompt(target.tokenizer, p) for p in prompts]
    texts = g.greedy_continuations(target, ids_list, max_new_tokens=n, batch_size=32)
    out: list[tuple[float, bool, bool | None]] = []
    for start in range(0, len(ids_list), 8):
        rows = range(start, min(start + 8, len(ids_list)))
        ids, mask = g.right_pad([ids_list[i] + texts[i] for i in rows], pad_id=0)
        text = g._text_pass(target, ids, mask)
        lens = [len(ids_list[i]) for i in rows]
        drafts = g.draft_everywhere(drafter, text.features, ids, lens, slots=k, steps=n).tolist()
        for offset, row in enumerate(rows):
            response = texts[row]
            end = next((j + 1 for j, t in enumerate(response) if t in target.eos_token_ids), n)
            probs = torch.softmax(text.logits[offset, lens[offset] - 1 : lens[offset] - 1 + end]
                                  .float(), dim=-1)  # fmt: skip
            for j in range(end):
                p = float(probs[j, response[j]])
                first = drafts[offset][j][0] == response[j]
                second = drafts[offset][j][1] == response[j + 1] if first and j + 1 < end else None
                out.append((p, first, second))
    return out


def _share(flags: Iterable[bool]) -> float | None:
    values = list(flags)
    return round(sum(values) / len(values), 4) if values else None


def table(found: list[tuple[float, bool, bool | None]]) -> dict[str, object]:
    bins = []
    for lo, hi in itertools.pairwise(EDGES):
        inside = [x for x in found if lo <= x[0] < hi]
        seconds = [x[2] for x in inside if x[2] is not None]
        bins.append({
            "target_p": f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}",
            "share": round(len(inside) / len(found), 4),
            "slot1_agreement": _share(x[1] for x in inside),
            "slot2_given_slot1": _share(seconds),
        })  # fmt: skip
    seconds = [x[2] for x in found if x[2] is not None]
    return {
        "positions": len(found),
        "mean_target_p": round(sum(x[0] for x in found) / len(found), 4),
        "slot1_agreement": _share(x[1] for x in found),
        "slot2_given_slot1": _share(seconds),
        "bins": bins,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--architecture", default="eagle3")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--corpus-size", type=int, default=6000)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--limit", type=int, help="at most this many prompts per set (smoke runs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = load_target()
    drafter = load_drafter_ref(args.drafter, target, architecture=args.architecture)
    drafter.eval()
    mtbench = load_prompts()
    sets = {
        "mt-bench first 20": mtbench[:20],
        "mt-bench other 60": mtbench[20:],
        "corpus held-out": load_training_prompts(min_prompts=args.corpus_size)[-args.heldout :],
    }
    report = {}
    for name, prompts in sets.items():
        prompts = prompts[: args.limit]
        found = positions(target, drafter, prompts, k=args.num_draft_tokens, n=args.max_new_tokens)
        report[name] = table(found)
        r = report[name]
        print(f"\n{name}: {r['positions']} positions, mean target p {r['mean_target_p']}, "
              f"slot 1 {r['slot1_agreement']}, slot 2 | 1 {r['slot2_given_slot1']}")  # fmt: skip
        for b in r["bins"]:  # type: ignore[attr-defined]
            print(f"  target p {b['target_p']}: {b['share']:.1%} of positions, slot 1 "
                  f"{b['slot1_agreement']}, slot 2 | slot 1 {b['slot2_given_slot1']}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"drafter": args.drafter, **report}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
