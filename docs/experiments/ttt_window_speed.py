"""Issue 14, training speed: the TTT unroll before and after later steps skip the entries that
carry no loss (prompt and padding entries of steps 1..S-1), on the recipe's own batches.

One process, the same drafter and batches. Each batch's target features are computed once; then
the old and the new unroll each run forward and backward under the recipe's bf16 autocast,
alternately (old, new, old, new, ...), and the medians are kept, so machine noise hits both.

    git show c2f258e:shared/draftopd/models/eagle3/ttt.py > /tmp/old_ttt.py
    PYTHONPATH=. .venv/bin/python docs/experiments/ttt_window_speed.py \
        --data runs/eagle3-recipe/data --old /tmp/old_ttt.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable

import torch

from draftopd.models.eagle3.ttt import ttt_unroll
from draftopd.models.target import load_target
from draftopd.training.data.batches import batch_indices, collate, target_features
from draftopd.training.sft.train import SFTConfig, _initial_drafter, load_samples


def _timed(fn: Callable[[], torch.Tensor], drafter: torch.nn.Module) -> tuple[float, float]:
    drafter.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn()
    loss.backward()
    return time.perf_counter() - t0, float(loss.detach())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--old", required=True, help="ttt.py from before the change")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("old_ttt", args.old)
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    spec.loader.exec_module(old)

    target = load_target()
    samples = load_samples(args.data)
    cfg = SFTConfig(batch_size=8, max_seq_len=384, draft_vocab_size=8000, ttt_steps=4)
    drafter = _initial_drafter(target, samples, cfg, None)
    times: dict[str, list[float]] = {"old": [], "new": []}
    loss_gap = 0.0
    entries = supervised = 0
    for step in range(args.batches):
        chosen = batch_indices(step, num_samples=len(samples), batch_size=8, seed=0)
        batch = collate([samples[i] for i in chosen], pad_id=0, max_length=384)
        features, logits = target_features(target, batch.input_ids, batch.attention_mask)
        logits = logits[..., drafter.d2t]  # the cache's draft-vocabulary logits, as in training
        inputs = (drafter, features, batch.input_ids, logits, batch.loss_mask,
                  batch.attention_mask)  # fmt: skip
        entries += batch.input_ids.numel()
        supervised += int(batch.loss_mask.sum())
        for _ in range(args.repeats):
            for name, unroll in (("old", old.ttt_unroll), ("new", ttt_unroll)):
                seconds, loss = _timed(
                    lambda u=unroll, a=inputs: u(*a, steps=4, draft_vocab_logits=True).loss,
                    drafter,
                )
                times[name].append(seconds)
                if name == "old":
                    old_loss = loss
                else:
                    loss_gap = max(loss_gap, abs(loss - old_loss))
    old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"{args.batches} batches x {args.repeats}: {entries} entries, {supervised} supervised")
    print(f"TTT forward+backward, median: old {old_s * 1000:.0f} ms, new {new_s * 1000:.0f} ms, "
          f"{old_s / new_s:.2f}x; largest loss difference {loss_gap:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
