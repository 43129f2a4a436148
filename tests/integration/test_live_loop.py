"""The live loop on real processes (issue #17): a registry (SQLite, its controller on), an
inference service following ``production`` and the ``candidate`` canary with traffic capture on,
a Celery trainer and a rollout worker, all child processes over the machine's real Redis, on the
tiny target.

1. ``production`` is v1, a random drafter. Two clients send greedy requests the whole time.
2. A continual Draft-OPD job trains on the captured prompts once 8 new ones have arrived, from
   production; its version v2 becomes ``candidate`` at a 50% share; the policy promotes it on
   live τ.
3. A broken v3 (its LM head is zero, so it always proposes a token the target never emits here:
   τ = 1.0) is pushed to ``production``; the guard rolls it back to v2 within its window.

The round runs with stream B off and LR 3e-3: on this tiny target, whose greedy text collapses
into one repeated token, stream B from a cold start made a 6-step round erratic (measured: τ
stayed 1.0 for 3 of 4 seeds with it, reached 2.67 for 5 of 5 without), and at LR 1e-2 one late
step could undo the round (2.67 at step 5, 1.1 at step 6); at 3e-3 three seeds ended at
2.55-2.67. The test is about the loop, not about the loss.

Checked throughout: 0 failed requests, every output identical to plain greedy decoding; every
decision is an alias event with its figures; live τ per version is in the registry.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from draftopd.wire.registry_client import RegistryClient
from tests.processes import (
    celery_argv,
    free_port,
    service_env,
    spawn,
    stop,
    uvicorn_argv,
    wait_healthy,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "live-loop-token"
NAME = "tiny-live"
MAX_NEW, K = 24, 3
PROMPTS = [f"Tell me about thing number {i}." for i in range(12)]
GUARD_WINDOW_S = 120


@dataclass
class Tally:
    served: list[tuple[float, str]] = field(default_factory=list)  # (when, drafter version)
    failures: list[str] = field(default_factory=list)


def _references(target: TargetModel) -> dict[str, list[int]]:
    tokenizer: Any = target.tokenizer
    engine = DecodeEngine(target)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    return {p: engine.generate(list(tokenizer(p)["input_ids"]), params).token_ids for p in PROMPTS}


def _clients(url: str, references: dict[str, list[int]], stop_: threading.Event, tally: Tally):
    def loop(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            turn = index
            while not stop_.is_set():
                prompt = PROMPTS[turn % len(PROMPTS)]
                turn += 1
                try:
                    response = http.post(
                        "/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW}
                    )
                except httpx.HTTPError as err:
                    tally.failures.append(f"{prompt!r}: {err!r}")
                    continue
                if response.status_code != 200:
                    tally.failures.append(f"{prompt!r}: HTTP {response.status_code}")
                    continue
                body = response.json()
                if body["token_ids"] != references[prompt]:
                    tally.failures.append(
                        f"{prompt!r}: not plain greedy ({body['drafter_version']})"
                    )
                tally.served.append((time.monotonic(), body["drafter_version"]))
                time.sleep(0.02)

    return [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(2)]


@dataclass
class Stack:
    registry: RegistryClient  # with the write token
    inference_url: str
    logs: list[Path]
    broken: Path  # the broken drafter's checkpoint (uploaded by the test)
    broken_token: int  # the one token it proposes


def _checkpoints(target: TargetModel, tmp_path: Path) -> tuple[Path, Path, int]:
    """v1 (a random drafter) and the broken one (the same with a zero LM head: every draft is
    draft id 0, the token it maps to)."""
    vocab = target.vocab_size - 20
    good = save_drafter(random_drafter_for(target, seed=1, draft_vocab_size=vocab), tmp_path / "v1")
    broken = random_drafter_for(target, seed=1, draft_vocab_size=vocab)
    with torch.no_grad():
        broken.lm_head.weight.zero_()
    token = int(broken.d2t[0])
    return good, save_drafter(broken, tmp_path / "broken"), token


@pytest.fixture
def stack(
    redis_url: str, tiny_target: TargetModel, tiny_target_dir: Path, tmp_path: Path
) -> Iterator[Stack]:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    registry_port, inference_port = free_port(), free_port()
    registry_url = f"http://127.0.0.1:{registry_port}"
    registry_env = service_env(
        DRAFTOPD_REGISTRY_DATABASE_URL=db,
        DRAFTOPD_REGISTRY_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        DRAFTOPD_REGISTRY_API_TOKEN=TOKEN,
        DRAFTOPD_REGISTRY_REDIS_URL=redis_url,
        DRAFTOPD_REGISTRY_PUBLIC_URL=registry_url,
        DRAFTOPD_REGISTRY_POLICY_INTERVAL_S="0.5",
        DRAFTOPD_REGISTRY_CANARY_MIN_CYCLES="40",
        DRAFTOPD_REGISTRY_GUARD_MIN_CYCLES="20",
        DRAFTOPD_REGISTRY_GUARD_WINDOW_S=str(GUARD_WINDOW_S),
    )
    subprocess.run(
        [sys.executable, "-m", "services.registry.migrate"], env=registry_env, check=True,
        cwd=REPO, capture_output=True, timeout=120,
    )  # fmt: skip
    common = {"REGISTRY_URL": registry_url, "REGISTRY_TOKEN": TOKEN, "REDIS_URL": redis_url}
    envs = {
        "inference": service_env(
            **{f"DRAFTOPD_INFERENCE_{k}": v for k, v in common.items()},
            DRAFTOPD_INFERENCE_TARGET=str(tiny_target_dir),
            DRAFTOPD_INFERENCE_DRAFTER_NAME=NAME,
            DRAFTOPD_INFERENCE_CAPTURE_RATE="1",
            DRAFTOPD_INFERENCE_LIVE_REPORT_S="0.5",
            DRAFTOPD_INFERENCE_ALIAS_POLL_S="1",
            DRAFTOPD_INFERENCE_NUM_DRAFT_TOKENS=str(K),
            DRAFTOPD_INFERENCE_TORCH_THREADS="1",
            DRAFTOPD_INFERENCE_MAX_CONCURRENCY="2",
            DRAFTOPD_INFERENCE_ARTIFACT_CACHE_DIR=str(tmp_path / "inference-cache"),
        ),
        "trainer": service_env(
            **{f"DRAFTOPD_TRAINER_{k}": v for k, v in common.items()},
            DRAFTOPD_TRAINER_TORCH_THREADS="1",
        ),
        "worker": service_env(
            **{f"DRAFTOPD_ROLLOUT_{k}": v for k, v in common.items()},
            DRAFTOPD_ROLLOUT_TARGET=str(tiny_target_dir),
            DRAFTOPD_ROLLOUT_CONSUMER="w1",
            DRAFTOPD_ROLLOUT_BLOCK_MS="100",
            DRAFTOPD_ROLLOUT_TORCH_THREADS="1",
            DRAFTOPD_ROLLOUT_ARTIFACT_CACHE_DIR=str(tmp_path / "worker-cache"),
        ),
    }
    logs = [tmp_path / f"{n}.log" for n in ("registry", "inference", "trainer", "worker")]
    argv = {
        "inference": uvicorn_argv("services.inference.main:create_app", inference_port),
        "trainer": celery_argv(),
        "worker": uvicorn_argv("services.rollout_worker.main:create_app", free_port()),
    }
    procs = [
        spawn(
            uvicorn_argv("services.registry.main:create_app", registry_port), registry_env, logs[0]
        )
    ]
    try:
        wait_healthy(registry_url, procs[0], logs, 120)
        client = RegistryClient(registry_url, token=TOKEN)
        client.create_drafter(NAME, target_model="tiny", architecture="eagle3")
        good, broken, token = _checkpoints(tiny_target, tmp_path)
        client.upload_version(NAME, good)
        client.put_alias(NAME, "production", 1)
        for log, name in zip(logs[1:], ("inference", "trainer", "worker"), strict=True):
            procs.append(spawn(argv[name], envs[name], log))
        wait_healthy(f"http://127.0.0.1:{inference_port}", procs[1], logs, 180)
        yield Stack(client, f"http://127.0.0.1:{inference_port}", logs, broken, token)
        client.close()
    finally:
        stop(procs)


def _events(stack: Stack) -> list[dict[str, Any]]:
    return list(reversed(stack.registry.list_events(NAME, limit=1000)))  # oldest first


def _event(stack: Stack, cause: str) -> dict[str, Any] | None:
    return next((e for e in _events(stack) if e["cause"].startswith(cause)), None)


@pytest.mark.timeout(900)
def test_continual_job_canary_promotion_and_guard_rollback_on_live_traffic(
    stack: Stack, tiny_target: TargetModel, tiny_target_dir: Path, tmp_path: Path
) -> None:
    references = _references(tiny_target)
    assert all(stack.broken_token not in ids for ids in references.values())  # it never matches
    tally, stop_clients = Tally(), threading.Event()
    clients = _clients(stack.inference_url, references, stop_clients, tally)
    for thread in clients:
        thread.start()
    logs = stack.logs
    try:
        # 1-2. a continual job: a round on 8 new captured prompts, canaried at 50%, promoted
        spec = {
            "mode": "draft_opd",
            "run": {
                "out_dir": str(tmp_path / "continual"), "target": str(tiny_target_dir),
                "heldout": 2, "threads": 1,
                "prompts": {"source": "traffic", "min_prompts": 8, "max_prompts": 64},
            },
            "opd": {
                "drafter": f"registry://{NAME}/1", "total_steps": 6, "prompts_per_step": 4,
                "num_draft_tokens": K, "max_new_tokens": MAX_NEW, "lr": 3e-3, "eval_every": 0,
                "eval_max_new_tokens": MAX_NEW, "checkpoint_every": 6, "requests_per_step": 2,
                "rollout_timeout_s": 120, "lambda_b": 0.0,
            },
        }  # fmt: skip
        job = stack.registry.create_train_job(
            NAME, spec, continual={"min_new_prompts": 8, "traffic": 0.5, "max_rounds": 1}
        )
        wait_until(lambda: _event(stack, "canary:") is not None, 420,
                   "the canary's verdict", logs, poll=0.5)  # fmt: skip
        promoted = _event(stack, "canary:")
        assert promoted is not None and promoted["cause"] == "canary:promote", promoted["detail"]
        wait_until(lambda: stack.registry.get_train_job(job["id"])["status"] == "succeeded",
                   30, "the continual job to finish its round", logs, poll=0.5)  # fmt: skip
        # 3. a broken version pushed to production is rolled back by the guard
        broken = stack.registry.upload_version(NAME, stack.broken)["version"]
        pushed_at = time.monotonic()
        stack.registry.put_alias(NAME, "production", broken)
        wait_until(lambda: _event(stack, "guard:rollback") is not None, GUARD_WINDOW_S,
                   "the guard's rollback", logs, poll=0.2)  # fmt: skip
        rolled_back_s = time.monotonic() - pushed_at
        served_after = len(tally.served)
        wait_until(
            lambda: f"{NAME}@2" in {v for _, v in tally.served[served_after:]},
            30, "v2 served again after the rollback", logs,
        )  # fmt: skip
    finally:
        stop_clients.set()
        for thread in clients:
            thread.join(timeout=120)

    finished = stack.registry.get_train_job(job["id"])
    events = _events(stack)
    live = {row["version"]: row for row in stack.registry.list_live(NAME)}
    print(f"\nrolled back {rolled_back_s:.1f} s after the push; {len(tally.served)} requests")
    for event in events:
        detail = event["detail"] or {}
        print(event["alias"], event["from_version"], "->", event["to_version"], event["cause"],
              event["traffic"], detail.get("reason"))  # fmt: skip
    for version, row in sorted(live.items()):
        tau, stderr, rate = row["tau"], row["tau_stderr"], row["tokens_per_s"]
        print(f"live v{version}: tau {tau:.3f} ± {stderr:.3f}, {row['cycles']} cycles, "
              f"{row['requests']} requests, {rate:.0f} tok/s")  # fmt: skip

    assert tally.failures == [], tally.failures[:5]
    versions = {v for _, v in tally.served}
    assert {f"{NAME}@1", f"{NAME}@2", f"{NAME}@{broken}"} <= versions
    round_job = stack.registry.get_train_job(finished["continual"]["history"][0]["job"])
    assert round_job["parent_id"] == job["id"] and round_job["status"] == "succeeded"
    assert round_job["produced_versions"][-1] == 2 and round_job["base_version"] == 1
    assert finished["continual"]["history"][0]["outcome"].startswith("promoted")
    causes = [(e["alias"], e["cause"], e["to_version"], e["traffic"]) for e in events]
    assert causes == [
        ("production", "api", 1, None),
        ("candidate", f"continual:{job['id']}", 2, 0.5),
        ("production", "canary:promote", 2, None),
        ("candidate", "canary:promote", 2, 0.0),
        ("production", "api", broken, None),
        ("production", "guard:rollback", 2, None),
    ]
    assert promoted["detail"]["candidate_cycles"] >= 40
    assert promoted["detail"]["production_cycles"] >= 40
    assert rolled_back_s < GUARD_WINDOW_S
    assert live[broken]["tau"] == 1.0
    assert live[2]["tau"] > live[1]["tau"]
    assert stack.registry.get_alias(NAME, "production")["version"] == 2
