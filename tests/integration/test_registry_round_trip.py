"""Issue 5's round trip over HTTP, every service a real process: registry on a scratch Postgres
database, a Celery trainer, a rollout worker and an inference service, over the real Redis.

POST /train-jobs (tiny sft) -> the trainer runs it -> GET shows it running, then succeeded -> the
registry lists its versions with tau -> POST /train-jobs (tiny draft_opd from the registered SFT
version) -> succeeded, its versions registered as children -> PUT production -> inference serves
that version, and its speculative output equals plain greedy decoding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from draftopd.wire.registry_client import RegistryClient
from services.registry.migrate import upgrade_head
from tests.services.registry.helpers import scratch_postgres

REPO = Path(__file__).resolve().parents[2]
TOKEN = "round-trip-token"
DRAFTER = "tiny-eagle3"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs, self.logs = tmp, [], []  # type: ignore[var-annotated]

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        full_env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'shared'}", **env}
        handle = log.open("wb")
        self.procs.append(
            subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT)
        )

    def uvicorn(self, name: str, app: str, env: dict[str, str]) -> str:
        port = _port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", app, "--port", str(port)]
        self.spawn(name, argv, env)
        url = f"http://127.0.0.1:{port}"
        self.wait(lambda: _healthy(url), 120, f"{name} /health")
        return url

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs)
        pytest.fail(f"timed out waiting for {what}\n{tails}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, redis_url: str, tiny_target_dir: Path, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    architecture = getattr(request, "param", "eagle3")  # the registry drafter's family
    with scratch_postgres(f"draftopd_round_trip_{os.getpid()}") as db_url:
        upgrade_head(db_url)
        running = Stack(tmp_path)
        try:
            registry = running.uvicorn(
                "registry",
                "services.registry.main:create_app",
                {
                    "DRAFTOPD_REGISTRY_DATABASE_URL": db_url,
                    "DRAFTOPD_REGISTRY_ARTIFACT_DIR": str(tmp_path / "artifacts"),
                    "DRAFTOPD_REGISTRY_API_TOKEN": TOKEN,
                    "DRAFTOPD_REGISTRY_REDIS_URL": redis_url,
                },
            )
            client = RegistryClient(registry, token=TOKEN)
            client.create_drafter(DRAFTER, target_model="tiny", architecture=architecture)
            celery = [sys.executable, "-m", "celery", "-A", "services.trainer.celery_app"]
            celery += ["worker", "-Q", "train", "--pool", "solo", "--without-gossip"]
            running.spawn(
                "trainer",
                celery,
                {
                    "DRAFTOPD_TRAINER_REDIS_URL": redis_url,
                    "DRAFTOPD_TRAINER_REGISTRY_URL": registry,
                    "DRAFTOPD_TRAINER_REGISTRY_TOKEN": TOKEN,
                    "DRAFTOPD_TRAINER_TORCH_THREADS": "1",
                },
            )
            target = str(tiny_target_dir)
            common = {"TARGET": target, "REDIS_URL": redis_url, "TORCH_THREADS": "1"}
            running.uvicorn(
                "rollout-worker",
                "services.rollout_worker.main:create_app",
                {f"DRAFTOPD_ROLLOUT_{k}": v for k, v in {**common, "BLOCK_MS": "100"}.items()},
            )
            inference_env = {
                **common,
                "REGISTRY_URL": registry,
                "DRAFTER_NAME": DRAFTER,
                "ALIAS_POLL_S": "1",
                "ARTIFACT_CACHE_DIR": str(tmp_path / "cache"),
            }
            inference = running.uvicorn(
                "inference",
                "services.inference.main:create_app",
                {f"DRAFTOPD_INFERENCE_{k}": v for k, v in inference_env.items()},
            )
            yield {
                "stack": running,
                "client": client,
                "inference": inference,
                "architecture": architecture,
            }
            client.close()
        finally:
            running.stop()


def _run_job(stack: dict[str, Any], spec: dict[str, Any], **kw: Any) -> tuple[dict, list]:
    client: RegistryClient = stack["client"]
    job = client.create_train_job(DRAFTER, spec, **kw)
    seen: list[tuple[str, float]] = []

    def done() -> dict[str, Any] | None:
        state = client.get_train_job(job["id"])
        seen.append((state["status"], state["progress"]))
        return state if state["status"] in ("succeeded", "failed", "cancelled") else None

    final = stack["stack"].wait(done, 240, f"job {job['id']}")
    assert final["status"] == "succeeded", final["error"]
    return final, seen


@pytest.mark.parametrize("stack", ["eagle3", "dflash"], indirect=True)
def test_train_jobs_register_versions_and_inference_serves_the_promoted_one(
    stack: dict[str, Any], tiny_target_dir: Path, tmp_path: Path
) -> None:
    client: RegistryClient = stack["client"]
    family = stack["architecture"]
    # a DFlash job trains a block drafter: B = 4, so 3 drafted slots per pass
    family_sft = {"drafter_type": "dflash", "block_size": 4} if family == "dflash" else {}
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"Tell me about thing number {i}."} for i in range(40)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"target": str(tiny_target_dir), "prompts": str(prompts), "heldout": 3, "threads": 1}
    sft = {
        **base,
        "mode": "sft",
        "out_dir": str(tmp_path / "sft"),
        "limit": 20,
        "max_new_tokens": 16,
        "sft": {"total_steps": 40, "batch_size": 4, "ttt_steps": 2, "draft_vocab_size": 200,
                "lr": 1e-2, "eval_every": 20, "checkpoint_every": 20, "eval_max_new_tokens": 16,
                **family_sft},
    }  # fmt: skip
    job, seen = _run_job(stack, sft)
    assert ("running", 0.0) in seen and any(0 < p < 1 for s, p in seen if s == "running")
    assert job["produced_versions"] == [1, 2] and job["tau"] is not None
    versions = client.list_versions(DRAFTER)
    assert [(v["version"], v["step"], v["job_id"]) for v in versions] == [
        (1, 20, job["id"]),
        (2, 40, job["id"]),
    ]
    assert client.list_metrics(DRAFTER, 2)[0]["tau"] == pytest.approx(job["tau"])
    assert client.get_version(DRAFTER, 2)["config"]["architecture"] == family

    opd = {
        **base,
        "mode": "draft_opd",
        "out_dir": str(tmp_path / "opd"),
        "skip": 20,
        "drafter": f"registry://{DRAFTER}/2",
        "requests_per_step": 1,
        "rollout_timeout_s": 120,
        "opd": {"total_steps": 3, "prompts_per_step": 2, "num_draft_tokens": 3,
                "max_new_tokens": 12, "eval_every": 3, "checkpoint_every": 3,
                "eval_max_new_tokens": 12, "rollout_mode": "batched"},
    }  # fmt: skip
    job2, _ = _run_job(stack, opd, base_version=2)
    assert job2["produced_versions"] == [3]
    v3 = client.get_version(DRAFTER, 3)
    assert (v3["parent_version"], v3["step"], v3["job_id"]) == (2, 3, job2["id"])
    assert client.list_metrics(DRAFTER, 3)[0]["tau"] == pytest.approx(job2["tau"])

    client.put_alias(DRAFTER, "production", 3)
    inference = stack["inference"]
    served = stack["stack"].wait(
        lambda: httpx.get(f"{inference}/drafter").json().get("version") == f"{DRAFTER}@3",
        10,
        "inference to serve v3",
    )
    assert served
    request = {"prompt": "Tell me about thing number 3.", "max_new_tokens": 24}
    spec_out = httpx.post(
        f"{inference}/generate", json={**request, "speculative": {"method": family}}, timeout=60
    ).json()
    plain = httpx.post(
        f"{inference}/generate", json={**request, "speculative": {"method": "none"}}, timeout=60
    ).json()
    assert spec_out["drafter_version"] == f"{DRAFTER}@3"
    assert spec_out["token_ids"] == plain["token_ids"] and spec_out["speculative"]["cycles"] > 0
