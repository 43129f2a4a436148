"""Load test of inference with bounded admission (loopback only, bounded in time).

    PYTHONPATH=. .venv/bin/python docs/experiments/load_test.py --clients 16 --seconds 180 \
        --json docs/bench/load_test.json

Serves SmolLM2 (max_concurrency 1, max_queued 8) in this process with uvicorn, then runs
``--clients`` concurrent streaming clients for ``--seconds``. Each client loops over MT-Bench
prompts, greedy, alternating n-gram and EAGLE-3 (random:0 drafter) speculation; a 429 is
retried after its Retry-After. Reported: completed requests, deliberate 429s, failures (anything
else), p50 and p99 latency of completed requests, and whether every completed output equals
plain greedy decoding of the same prompt (computed afterwards on the same weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx

from draftopd.models.target import load_target
from draftopd.prompts import load_prompts, render_prompt
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from services.inference.main import create_app
from services.inference.settings import InferenceSettings
from tests.servers import uvicorn_in_thread

MAX_NEW = 32


async def client_loop(
    index: int, url: str, prompts: list[str], stop_at: float, log: list[dict[str, Any]]
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        turn = 0
        while time.monotonic() < stop_at:
            prompt = prompts[(index + turn) % len(prompts)]
            method = "ngram" if (index + turn) % 2 else "eagle3"
            turn += 1
            body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": MAX_NEW,
                    "stream": True, "speculative": {"method": method}}  # fmt: skip
            t0 = time.monotonic()
            entry: dict[str, Any] = {"client": index, "prompt": prompt, "method": method}
            try:
                async with http.stream("POST", "/generate", json=body) as response:
                    entry["status"] = response.status_code
                    if response.status_code == 429:
                        entry["retry_after"] = float(response.headers["retry-after"])
                        await response.aread()
                    elif response.status_code == 200:
                        final = None
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                event = json.loads(line[len("data: ") :])
                                final = event if event.get("type") == "final" else final
                        entry["token_ids"] = final["token_ids"] if final else None
                    else:
                        entry["body"] = (await response.aread()).decode()[:300]
            except httpx.HTTPError as err:
                entry["status"] = -1
                entry["error"] = repr(err)
            entry["latency_s"] = time.monotonic() - t0
            log.append(entry)
            if entry.get("status") == 429:
                await asyncio.sleep(entry["retry_after"])


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--max-queued", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    prompts = [
        p.messages[0]["content"] if p.messages else p.text or "" for p in load_prompts(None, 10)
    ]
    settings = InferenceSettings(target="smollm2", drafter="random:0", torch_threads=2,
                                 max_concurrency=1, max_queued=args.max_queued)  # fmt: skip
    log: list[dict[str, Any]] = []
    with uvicorn_in_thread(create_app(settings), name="load-inference") as (url, _):
        stop_at = time.monotonic() + args.seconds

        async def run_all() -> None:
            await asyncio.gather(
                *(client_loop(i, url, prompts, stop_at, log) for i in range(args.clients))
            )

        started = time.monotonic()
        asyncio.run(run_all())
        wall = time.monotonic() - started
    done = [e for e in log if e["status"] == 200 and e.get("token_ids") is not None]
    rejected = [e for e in log if e["status"] == 429]
    failed = [e for e in log if e not in done and e not in rejected]
    target = load_target("smollm2")
    engine = DecodeEngine(target)
    expected: dict[str, list[int]] = {}
    for prompt in {e["prompt"] for e in done}:
        ids = render_prompt(target.tokenizer, load_prompts_text(prompt))
        expected[prompt] = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW)).token_ids
    identical = sum(e["token_ids"] == expected[e["prompt"]] for e in done)
    latencies = sorted(e["latency_s"] for e in done)
    result = {
        "clients": args.clients, "seconds": round(wall, 1), "max_concurrency": 1,
        "max_queued": args.max_queued, "completed": len(done), "rejected_429": len(rejected),
        "failed": len(failed), "identical_to_plain_greedy": identical,
        "p50_latency_s": round(statistics.median(latencies), 2) if latencies else None,
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2)
        if latencies else None,
        "failures": [{k: v for k, v in e.items() if k != "token_ids"} for e in failed][:10],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if not failed and identical == len(done) else 1


def load_prompts_text(text: str) -> Any:
    """A Prompt for ``text`` as a user message (what the clients sent)."""
    from draftopd.prompts import Prompt

    return Prompt(id="load", messages=[{"role": "user", "content": text}], text=None,
                  source="messages")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
