"""Target data generation throughput against batch size (issue 14, "faster data generation").

Runs ``regenerate`` (batched greedy ``generate``, prompts sorted by length inside each window) on
the same corpus prompts at each batch size, in one process, and prints response tokens/s. Run it
on a quiet machine:

    PYTHONPATH=. .venv/bin/python docs/experiments/regen_batch_sizes.py --prompts 128 \
        --max-new-tokens 128 --batch-sizes 8 16 32 64 128
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from draftopd.models.target import load_target
from draftopd.training.data.corpus import load_training_prompts
from draftopd.training.data.regenerate import regenerate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target("smollm2")
    prompts = load_training_prompts(None)[: args.prompts]
    rows = []
    for batch_size in args.batch_sizes:
        with tempfile.TemporaryDirectory() as out:
            stats = regenerate(
                target,
                prompts,
                out,
                max_new_tokens=args.max_new_tokens,
                batch_size=batch_size,
                shard_size=max(args.prompts, batch_size),
                progress=False,
            )
        row = {
            "batch_size": batch_size,
            "tokens": stats.tokens,
            "seconds": round(stats.seconds, 1),
            "tokens_per_s": round(stats.tokens_per_s, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
