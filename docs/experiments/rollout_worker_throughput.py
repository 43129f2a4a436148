"""Rollout tokens/s of one real rollout-worker service, per rollout mode (engine, batched).

Starts the worker (uvicorn, SmolLM2 target) as a subprocess, sends it one request per mode with
the same fresh corpus prompts and drafter, waits for the records, and prints the worker's own
/metrics figures (tokens / busy seconds) next to the wall-clock the records took.

    .venv/bin/python docs/experiments/rollout_worker_throughput.py \
        --drafter runs/sft-smollm2/checkpoints/step-00000300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import httpx
import redis

from draftopd.models.target import load_target
from draftopd.prompts import render_prompt
from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.training.data.corpus import load_training_prompts
from draftopd.wire.rollout_queue import RolloutRequest, enqueue


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafter", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--port", type=int, default=8012)
    args = p.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    tokenizer = load_target("smollm2").tokenizer
    prompts = load_training_prompts()[1000 : 1000 + args.prompts]
    rendered = [render_prompt(tokenizer, x) for x in prompts]
    env = {
        **os.environ,
        "DRAFTOPD_ROLLOUT_REDIS_URL": args.redis_url,
        "DRAFTOPD_ROLLOUT_TARGET": "smollm2",
        "DRAFTOPD_ROLLOUT_TORCH_THREADS": str(args.threads),
        "DRAFTOPD_ROLLOUT_BLOCK_MS": "100",
    }
    app = "services.rollout_worker.main:create_app"
    cmd = [sys.executable, "-m", "uvicorn", app, "--factory", "--port", str(args.port)]
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/health").json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        for mode in ("engine", "batched"):
            job = f"throughput-{mode}"
            tokens0 = _metric(base, "draftopd_rollout_tokens")
            busy0 = _busy(base)
            t0 = time.perf_counter()
            request = RolloutRequest(
                job_id=job,
                request_id="r0",
                drafter_version="0",
                drafter_path=args.drafter,
                prompts=rendered,
                num_draft_tokens=args.num_draft_tokens,
                max_new_tokens=args.max_new_tokens,
                mode=mode,
            )
            enqueue(client, [request])
            while client.xlen(stream_key(job)) < len(rendered):
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            records = [RolloutRecord.from_fields(f) for _, f in client.xrange(stream_key(job))]
            tokens = _metric(base, "draftopd_rollout_tokens") - tokens0
            cycles = sum(len(r.cycles) for r in records)
            print(
                f"{mode}: {len(records)} sequences, {tokens:.0f} tokens, {wall:.1f} s wall "
                f"(drafter load included), {tokens / (_busy(base) - busy0):.1f} tokens/s busy, "
                f"{tokens / wall:.1f} tokens/s wall, rollout tau {tokens / cycles:.3f}"
            )
    finally:
        worker.terminate()
        worker.wait(30)
    return 0


def _busy(base: str) -> float:
    """Busy seconds, from the worker's tokens and tokens/s gauges."""
    tokens = _metric(base, "draftopd_rollout_tokens")
    rate = _metric(base, "draftopd_rollout_tokens_per_second")
    return tokens / rate if rate else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
