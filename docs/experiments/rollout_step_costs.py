"""Issue 16, build item 1: where one batched greedy Draft-OPD step's seconds go, before and after
the learner reads the rollouts' own text pass and the rejected-branch pass stopped holding full
logits. One process, the same drafter, prompts and greedy texts; each part timed REPEATS times
alternately (old, new, old, new, ...) and the median kept, so machine noise hits both alike.

    PYTHONPATH=. .venv/bin/python docs/experiments/rollout_step_costs.py \
        --drafter runs/plateau/dflash-b8-l3/checkpoints/step-00000650 --architecture dflash \
        --num-draft-tokens 7 --old-branch /tmp/old_greedy_rollouts.py

``--old-branch`` is greedy_rollouts.py from before the change (git show 4df729e:shared/draftopd/
training/opd/greedy_rollouts.py), imported for its ``_branch_logprobs``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time

import torch

from draftopd.bench import load_drafter_ref
from draftopd.models.target import crop_cache, load_target
from draftopd.prompts import render_prompt
from draftopd.training.data.corpus import load_training_prompts
from draftopd.training.opd import greedy_rollouts as g
from draftopd.training.opd.train import OPDConfig, OPDLearner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--architecture", default="dflash")
    parser.add_argument("--num-draft-tokens", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-branch", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("old_greedy_rollouts", args.old_branch)
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up
    spec.loader.exec_module(old)

    target = load_target()
    drafter = load_drafter_ref(args.drafter, target, architecture=args.architecture)
    corpus = load_training_prompts(min_prompts=4000)[2200:]  # prompts the arms never saw
    prompts = [render_prompt(target.tokenizer, p) for p in corpus[: args.prompts]]
    n = args.max_new_tokens
    t0 = time.perf_counter()
    texts = g.greedy_continuations(target, prompts, max_new_tokens=n, batch_size=64)
    texts_s = time.perf_counter() - t0
    k = drafter.drafts_per_cycle(args.num_draft_tokens)
    ids, mask = g.right_pad([p + t for p, t in zip(prompts, texts, strict=True)], pad_id=0)
    lens = [len(p) for p in prompts]
    text = g._text_pass(target, ids, mask)
    drafts = g.draft_everywhere(drafter, text.features, ids, lens, slots=k, steps=n).tolist()
    eos = target.eos_token_ids
    cycles = [
        g.walk_cycles(t, d, num_draft_tokens=k, max_new_tokens=n, eos=eos)
        for t, d in zip(texts, drafts, strict=True)
    ]
    branch_tokens = sum(max(len(c.proposed) - c.accepted - 1, 0) for r in cycles for c in r)
    cfg = OPDConfig.from_dict(
        {"num_draft_tokens": args.num_draft_tokens, "lr": 3e-4, "max_new_tokens": n}
    )
    times: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for _ in range(args.repeats):
        width = ids.shape[1]
        crop_cache(text.cache, width)  # each branch pass appends its tokens to the cache
        t0 = time.perf_counter()
        before = old._branch_logprobs(target, text, lens, cycles)
        add("branch_old", time.perf_counter() - t0)
        crop_cache(text.cache, width)
        t0 = time.perf_counter()
        after = g._branch_logprobs(target, text, lens, cycles)
        add("branch_new", time.perf_counter() - t0)
        flat_before = [x for row in before for cycle in row for x in cycle]
        flat_after = [x for row in after for cycle in row for x in cycle]
        add(
            "branch_max_abs_diff",
            max(abs(x - y) for x, y in zip(flat_before, flat_after, strict=True)),
        )
        outputs: g.TargetOutputs = {}
        t0 = time.perf_counter()
        records = g.batched_greedy_rollouts(
            target, drafter, prompts, num_draft_tokens=args.num_draft_tokens, max_new_tokens=n,
            batch_size=len(prompts), texts=texts, target_outputs=outputs,
        )  # fmt: skip
        add("rollout_new", time.perf_counter() - t0)
        for shared, name in ((None, "update_own_pass"), (outputs, "update_shared_pass")):
            learner = OPDLearner(target, copy.deepcopy(drafter), cfg)
            t0 = time.perf_counter()
            stats = learner.update(records, target_outputs=shared)
            add(name, time.perf_counter() - t0)
            add(f"{name}_target_s", stats["target_s"])
    report = {
        "drafter": args.drafter,
        "prompts": len(prompts),
        "texts_s": texts_s,
        "target_tokens": sum(len(t) for t in texts),
        "branch_tokens": branch_tokens,
        "median_s": {name: statistics.median(v) for name, v in times.items()},
        "all_s": times,
    }
    print(json.dumps(report["median_s"], indent=1), "branch tokens", branch_tokens)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
