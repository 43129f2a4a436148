"""One round of the live loop on a running `draftopd up` stack (SmolLM2), end to end.

Start the stack with capture on and a policy sized for a demo, then run this script:

    DRAFTOPD_INFERENCE_CAPTURE_RATE=1 DRAFTOPD_INFERENCE_LIVE_REPORT_S=2 \\
    DRAFTOPD_INFERENCE_MAX_CONCURRENCY=2 DRAFTOPD_REGISTRY_POLICY_INTERVAL_S=2 \\
    DRAFTOPD_REGISTRY_CANARY_MIN_CYCLES=300 DRAFTOPD_REGISTRY_CANARY_MAX_CYCLES=3000 \\
    DRAFTOPD_REGISTRY_GUARD_MIN_CYCLES=100 \\
    .venv/bin/draftopd up --data-dir /tmp/demo-stack &
    .venv/bin/python docs/experiments/live_loop_demo.py --data-dir /tmp/demo-stack

What it does:
1. If ``production`` is not set: a small SFT job (corpus prompts 0-63) registers v1 and moves
   ``production`` to it (``promote_to``).
2. Two clients send chat requests (48 new tokens, greedy) built from corpus prompts 1000-1039
   (never MT-Bench). Each prompt's plain output (``method: none``) is fetched once and every
   speculative answer is compared with it token for token.
3. A continual Draft-OPD job: a round once 16 new prompts were captured, from production, its
   version canaried at a 50% share, then promoted or discarded by live τ.
4. A broken version (the production drafter with a zero LM head and its draft id 0 remapped to
   the rarest draft token, so its every proposal is wrong) is pushed to ``production``; the
   guard must roll it back.
5. Prints the registry's events and the live τ per version, and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from safetensors.numpy import load_file, save_file

from draftopd.training.data.corpus import build_corpus
from draftopd.wire.registry_client import RegistryClient

MAX_NEW = 48


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _events(client: RegistryClient, name: str) -> list[dict[str, Any]]:
    return list(reversed(client.list_events(name, limit=1000)))


def _ensure_production(client: RegistryClient, name: str) -> int:
    try:
        return int(client.get_alias(name, "production")["version"])
    except Exception:  # noqa: BLE001 - no alias yet: train one
        pass
    spec = {
        "mode": "sft",
        "run": {"out_dir": "runs/demo-sft", "limit": 64, "heldout": 4, "threads": 1},
        "sft": {"max_new_tokens": 64, "gen_batch_size": 16, "total_steps": 24, "batch_size": 4,
                "draft_vocab_size": 8000, "max_seq_len": 256, "eval_every": 24,
                "checkpoint_every": 24, "eval_max_new_tokens": 16},
    }  # fmt: skip
    job = client.create_train_job(name, spec, promote_to="production")
    print(f"v1: SFT job {job['id']}", flush=True)
    _wait(lambda: client.get_train_job(job["id"])["status"] in ("succeeded", "failed"), 3600,
          "the SFT job")  # fmt: skip
    done = client.get_train_job(job["id"])
    if done["status"] != "succeeded":
        raise SystemExit(f"SFT job failed: {done['error']}")
    return int(client.get_alias(name, "production")["version"])


def _broken_copy(client: RegistryClient, name: str, version: int, work: Path) -> Path:
    source = client.fetch_version(name, version, work / "cache")
    out = work / f"broken-from-v{version}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"][:] = 0  # every logit 0: the drafter always proposes draft id 0
    d2t, t2d = tensors["d2t"].copy(), tensors["t2d"].copy()
    last = len(d2t) - 1  # draft ids are ordered by frequency: the last is the rarest token
    first_token, last_token = int(d2t[0]), int(d2t[last])
    d2t[0], d2t[last] = last_token, first_token
    t2d[last_token], t2d[first_token] = 0, last
    tensors["d2t"], tensors["t2d"] = d2t, t2d
    save_file(tensors, str(out / "model.safetensors"))
    return out


class Traffic:
    def __init__(self, url: str, prompts: list[str]) -> None:
        self.url, self.prompts = url, prompts
        self.plain: dict[str, list[int]] = {}
        self.served: list[tuple[float, str | None, float]] = []
        self.failures: list[str] = []
        self.mismatches = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _post(self, http: httpx.Client, prompt: str, method: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}], "max_new_tokens": MAX_NEW,
        }  # fmt: skip
        if method is not None:
            body["speculative"] = {"method": method}
        response = http.post("/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        result: dict[str, Any] = response.json()
        return result

    def client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as http:
            turn = index
            while not self.stop.is_set():
                prompt = self.prompts[turn % len(self.prompts)]
                turn += 2
                try:
                    if prompt not in self.plain:
                        self.plain[prompt] = self._post(http, prompt, "none")["token_ids"]
                    body = self._post(http, prompt, None)
                except (httpx.HTTPError, RuntimeError) as err:
                    self.failures.append(repr(err))
                    continue
                with self.lock:
                    self.mismatches += int(body["token_ids"] != self.plain[prompt])
                    self.served.append(
                        (time.time(), body["drafter_version"], body["speculative"]["tau"])
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--drafter", default="smollm2-eagle3")
    parser.add_argument("--opd-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/live_loop_demo.json"))
    args = parser.parse_args()
    state = json.loads((args.data_dir / "stack.json").read_text())
    token = (args.data_dir / "api_token").read_text().strip()
    client = RegistryClient(state["registry_url"], token=token, timeout=120)
    name = args.drafter
    started = time.time()
    v1 = _ensure_production(client, name)
    print(f"production is v{v1}", flush=True)

    corpus = build_corpus(seed=0)
    traffic = Traffic(state["inference_url"], [p.text for p in corpus[1000:1040]])
    clients = [threading.Thread(target=traffic.client, args=(i,), daemon=True) for i in (0, 1)]
    for thread in clients:
        thread.start()
    try:
        spec = {
            "mode": "draft_opd",
            "run": {"out_dir": f"runs/demo-continual-{int(started)}", "heldout": 4, "threads": 1,
                    "prompts": {"source": "traffic", "min_prompts": 16, "max_prompts": 200}},
            "opd": {"drafter": f"registry://{name}/{v1}", "total_steps": args.opd_steps,
                    "prompts_per_step": 4, "requests_per_step": 1, "num_draft_tokens": 4,
                    "max_new_tokens": MAX_NEW, "rollout_mode": "batched", "lr": 3e-4,
                    "eval_every": args.opd_steps, "checkpoint_every": args.opd_steps,
                    "eval_max_new_tokens": 32},
        }  # fmt: skip
        running = [
            j for j in client.list_train_jobs(status="running", drafter=name) if j["continual"]
        ]
        if running:  # a rerun on the same stack resumes the continual job it left
            job = running[0]
        else:
            job = client.create_train_job(
                name, spec, continual={"min_new_prompts": 16, "traffic": 0.5, "max_rounds": 1}
            )
        print(f"continual job {job['id']} ({job['continual']['state']['phase']})", flush=True)
        _wait(lambda: client.get_train_job(job["id"])["status"] != "running", 3600,
              "the continual round and its canary")  # fmt: skip
        finished = client.get_train_job(job["id"])
        print("round:", json.dumps(finished["continual"]["history"]), flush=True)

        production = int(client.get_alias(name, "production")["version"])
        broken = client.upload_version(name, _broken_copy(client, name, production, Path("runs")))
        pushed = time.time()
        client.put_alias(name, "production", int(broken["version"]))
        print(f"pushed broken v{broken['version']} over v{production}", flush=True)
        _wait(lambda: any(e["cause"] == "guard:rollback" for e in _events(client, name)), 1200,
              "the guard's rollback")  # fmt: skip
        rollback = next(e for e in _events(client, name) if e["cause"] == "guard:rollback")
        print(f"rolled back after {time.time() - pushed:.0f} s", flush=True)
        time.sleep(10)
    finally:
        traffic.stop.set()
        for thread in clients:
            thread.join(timeout=600)

    events = _events(client, name)
    live = client.list_live(name)
    for event in events:
        reason = (event["detail"] or {}).get("reason", "")
        moved = f"v{event['from_version']} -> v{event['to_version']}"
        print(f"{event['created_at'][11:19]} {event['alias']:>10} {moved} {event['cause']} "
              f"traffic={event['traffic']} {reason}")  # fmt: skip
    for row in live:
        print(f"live v{row['version']}: tau {row['tau']:.3f} ± {row['tau_stderr']:.3f}, "
              f"{row['cycles']} cycles, {row['requests']} requests, "
              f"{row['tokens_per_s']:.1f} tok/s")  # fmt: skip
    wall = time.time() - started
    print(f"requests: {len(traffic.served)}, failed: {len(traffic.failures)}, "
          f"not plain greedy: {traffic.mismatches}, wall: {wall:.0f} s")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "events": events, "live": live, "job": finished, "rollback": rollback,
        "requests": len(traffic.served), "failures": traffic.failures,
        "mismatches": traffic.mismatches, "served": traffic.served,
    }, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
