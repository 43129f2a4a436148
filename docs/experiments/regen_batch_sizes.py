"""Target data generation throughput against batch size (issue 14, "faster data generation").

Runs ``regenerate`` on the same corpus prompts for each engine and batch size, in one process,
and prints response tokens/s: ``generate`` (HF batched generate, prompts sorted by length inside
each window), ``lean`` (continuous batching on the lean step) and ``lean+features`` (the same,
also capturing the feature cache). Run it on a quiet machine:

    PYTHONPATH=. .venv/bin/python docs/experiments/regen_batch_sizes.py --prompts 128 \
        --max-new-tokens 128 --engines generate lean lean+features --batch-sizes 16 32 64 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from draftopd.models.target import load_target
from draftopd.training.data.corpus import load_training_prompts
from draftopd.training.data.features import FeatureSpec
from draftopd.training.data.regenerate import regenerate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--engines", nargs="+", default=["generate", "lean", "lean+features"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target("smollm2")
    prompts = load_training_prompts(None)[: args.prompts]
    for engine, batch_size in itertools.product(args.engines, args.batch_sizes):
        with tempfile.TemporaryDirectory() as out:
            features = None
            if engine == "lean+features":
                features = FeatureSpec(Path(out) / "features", "bfloat16", 1024)
            stats = regenerate(
                target,
                prompts,
                Path(out) / "data",
                max_new_tokens=args.max_new_tokens,
                batch_size=batch_size,
                shard_size=max(args.prompts, batch_size),
                progress=False,
                engine=engine.split("+")[0],
                features=features,
            )
        row = {
            "engine": engine,
            "batch_size": batch_size,
            "tokens": stats.tokens,
            "seconds": round(stats.seconds, 1),
            "tokens_per_s": round(stats.tokens_per_s, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
