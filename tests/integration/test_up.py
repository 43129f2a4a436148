"""``draftopd up`` as a real process on the tiny target: the embedded Redis, SQLite, the registry,
inference, a rollout worker and the Celery trainer, wired together, then the walkthrough over HTTP.

Checked: plain and n-gram generation agree token for token before any drafter exists (and eagle3
is refused); registry writes need the printed token; an ``sft`` train job submitted with
``POST /train-jobs`` is picked up by the trainer and registers its checkpoints as versions with
their held-out tau; a ``draft_opd`` job from ``registry://`` version 2 (rollouts on the rollout
worker) registers version 3; ``PUT production`` makes inference serve it, and its eagle3 output is
the plain greedy output (the walkthrough's requests, docs/walkthrough.md). A second ``up`` on the
same data directory is refused while the first runs. SIGTERM (and Ctrl-C: SIGINT) stops every
child and frees every port; a restart reuses the token, the database and the alias (inference
serves the promoted version from its first request).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.processes import free_ports
from tests.servers import ctrl_c_default

REPO = Path(__file__).resolve().parents[2]
DRAFTER = "tiny-eagle3"
READY_LINE = "press Ctrl-C to stop"
PROMPT = "The quick brown fox"


PORT_NAMES = ("inference", "rollout", "registry", "redis")


def _free_ports() -> dict[str, int]:
    return dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (dead, waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str, logs: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    data_dir: Path
    ports: dict[str, int]

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def registry(self) -> str:
        return f"http://127.0.0.1:{self.ports['registry']}"

    def output(self) -> str:
        return self.stdout.read_text() + "\n--- stderr\n" + self.stderr.read_text()[-4000:]

    def wait_ready(self, timeout: float = 150) -> str:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.stdout.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"draftopd up did not come up:\n{self.output()}")
            time.sleep(0.25)
        return self.stdout.read_text()

    def descendants(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}


def _up_argv(target: Path, data_dir: Path, ports: dict[str, int]) -> list[str]:
    argv = [sys.executable, "-m", "draftopd.cli", "up", "--target", str(target)]
    argv += ["--data-dir", str(data_dir), "--drafter-name", DRAFTER, "--startup-timeout", "150"]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    return argv


def _up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'shared'}"
    env["DRAFTOPD_CACHE_DIR"] = str(tmp_path / "cache")  # nothing lands in ~/.cache
    for prefix in ("INFERENCE", "ROLLOUT", "TRAINER"):
        env[f"DRAFTOPD_{prefix}_TORCH_THREADS"] = "1"
    return env


@contextmanager
def running_up(target: Path, data_dir: Path, tmp_path: Path, tag: str) -> Iterator[Stack]:
    ports = _free_ports()
    stdout, stderr = tmp_path / f"up-{tag}.out", tmp_path / f"up-{tag}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            _up_argv(target, data_dir, ports),
            env=_up_env(tmp_path),
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=ctrl_c_default,
        )
    stack = Stack(process, stdout, stderr, data_dir, ports)
    try:
        yield stack
    finally:
        if process.poll() is None:  # a failed test: stop it the way a user would
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _stop_and_check_nothing_is_left(stack: Stack, signum: signal.Signals) -> None:
    state = json.loads((stack.data_dir / "stack.json").read_text())
    children = {name: info["pid"] for name, info in state["services"].items()}
    assert sorted(children) == ["inference", "redis", "registry", "rollout-worker", "trainer"]
    descendants = stack.descendants()
    assert set(children.values()) <= descendants  # stack.json names our real children
    stack.process.send_signal(signum)
    assert stack.process.wait(90) == 0, stack.output()
    pids = descendants | set(children.values())
    deadline = time.monotonic() + 10  # orphans are reaped by init shortly after they die
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if _alive(pid)]
    assert left == [], [" ".join(psutil.Process(pid).cmdline()) for pid in left]
    assert [name for name, port in stack.ports.items() if _port_open(port)] == []
    assert not (stack.data_dir / "stack.json").exists()
    assert "stopping redis" in stack.stderr.read_text()


def _generate(http: httpx.Client, base: str, method: str | None) -> httpx.Response:
    body: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": 16}
    if method is not None:
        body["speculative"] = {"method": method}
    return http.post(f"{base}/generate", json=body)


def _sft_spec(tmp_path: Path, target: Path) -> dict[str, Any]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(10)))
    return {  # the sectioned layout, as docs/walkthrough.md writes it
        "mode": "sft",
        "run": {
            "out_dir": "runs/first-sft",  # relative: under the trainer's directory in the data dir
            "target": str(target),
            "prompts": str(prompts),
            "heldout": 2,
            "threads": 1,
        },
        "sft": {
            "max_new_tokens": 8,
            "total_steps": 4,
            "batch_size": 2,
            "ttt_steps": 2,
            "draft_vocab_size": 64,
            "eval_every": 2,
            "checkpoint_every": 2,
            "eval_max_new_tokens": 8,
        },
    }


def _opd_spec(tmp_path: Path, target: Path) -> dict[str, Any]:
    return {  # the flat layout of earlier releases: still accepted
        "mode": "draft_opd",
        "out_dir": "runs/first-opd",
        "drafter": f"registry://{DRAFTER}/2",
        "target": str(target),
        "prompts": str(tmp_path / "prompts.jsonl"),
        "skip": 4,
        "heldout": 2,
        "threads": 1,
        "requests_per_step": 1,
        "rollout_timeout_s": 120,
        "opd": {"total_steps": 2, "prompts_per_step": 2, "max_new_tokens": 8,
                "num_draft_tokens": 3, "rollout_mode": "batched", "eval_every": 2,
                "checkpoint_every": 2, "eval_max_new_tokens": 8},
    }  # fmt: skip


def _run_job(
    http: httpx.Client, stack: Stack, body: dict[str, Any], auth: dict[str, str]
) -> dict[str, Any]:
    created = http.post(f"{stack.registry}/train-jobs", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job_url = f"{stack.registry}/train-jobs/{created.json()['id']}"

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(job_url).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job: dict[str, Any] = _wait_for(finished, 150, "the train job", stack.data_dir / "logs")
    assert job["status"] == "succeeded", job
    return job


def _walkthrough(stack: Stack, token: str, target: Path, tmp_path: Path) -> list[int]:
    """The walkthrough (docs/walkthrough.md); returns the plain greedy token ids of PROMPT."""
    with httpx.Client(timeout=60) as http:
        plain = _generate(http, stack.inference, "none").json()
        ngram = _generate(http, stack.inference, None).json()  # no drafter yet: ngram
        assert plain["drafter_version"] is None and ngram["speculative"]["method"] == "ngram"
        assert ngram["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 16
        assert _generate(http, stack.inference, "eagle3").status_code == 409

        job_body = {"drafter": DRAFTER, "spec": _sft_spec(tmp_path, target)}
        assert http.post(f"{stack.registry}/train-jobs", json=job_body).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        job = _run_job(http, stack, job_body, auth)
        assert (job["step"], job["total_steps"], job["produced_versions"]) == (4, 4, [1, 2])
        assert (stack.data_dir / "trainer/runs/first-sft/metrics.jsonl").is_file()

        # Draft-OPD from version 2, with a relative out_dir like the walkthrough's: the rollout
        # worker (another working directory) must still find each step's drafter
        opd_body = {"drafter": DRAFTER, "base_version": 2, "spec": _opd_spec(tmp_path, target)}
        job2 = _run_job(http, stack, opd_body, auth)
        assert (job2["step"], job2["produced_versions"]) == (2, [3])

        versions = http.get(f"{stack.registry}/drafters/{DRAFTER}/versions").json()
        assert [(v["version"], v["parent_version"], v["step"], v["job_id"]) for v in versions] == [
            (1, None, 2, job["id"]),
            (2, 1, 4, job["id"]),
            (3, 2, 2, job2["id"]),
        ]
        metrics = http.get(f"{stack.registry}/drafters/{DRAFTER}/versions/3/metrics").json()
        assert [m["benchmark"] for m in metrics] == ["heldout"]
        assert metrics[0]["tau"] == pytest.approx(job2["tau"]) and job2["tau"] >= 1.0

        moved = http.put(
            f"{stack.registry}/drafters/{DRAFTER}/aliases/production",
            json={"version": 3},
            headers=auth,
        )
        assert moved.status_code == 200 and moved.json()["version"] == 3
        served = f"{DRAFTER}@3"
        _wait_for(
            lambda: http.get(f"{stack.inference}/drafter").json()["version"] == served,
            15,
            "inference to serve the promoted version",
            stack.data_dir / "logs",
        )
        eagle = _generate(http, stack.inference, "eagle3").json()
        assert eagle["drafter_version"] == served
        assert eagle["speculative"]["method"] == "eagle3" and eagle["speculative"]["cycles"] > 0
        assert eagle["token_ids"] == plain["token_ids"]  # lossless
        rollout = http.get(f"http://127.0.0.1:{stack.ports['rollout']}/health").json()
        assert rollout["status"] == "ok" and rollout["redis"] is True
        tokens: list[int] = plain["token_ids"]
        return tokens


@pytest.mark.timeout(420)
def test_up_runs_the_walkthrough_and_stops_cleanly(tiny_target_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_up(tiny_target_dir, data_dir, tmp_path, "first") as stack:
        announced = stack.wait_ready()
        token = (data_dir / "api_token").read_text().strip()
        assert (data_dir / "api_token").stat().st_mode & 0o777 == 0o600
        assert token in announced and f"curl -s {stack.inference}/generate" in announced
        assert f"redis://127.0.0.1:{stack.ports['redis']}/0  (embedded)" in announced

        second = subprocess.run(
            _up_argv(tiny_target_dir, data_dir, _free_ports()),
            env=_up_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"another `draftopd up` is using {data_dir}" in second.stderr

        greedy = _walkthrough(stack, token, tiny_target_dir, tmp_path)
        _stop_and_check_nothing_is_left(stack, signal.SIGTERM)

    with running_up(tiny_target_dir, data_dir, tmp_path, "again") as stack:
        assert token in stack.wait_ready()  # the same token, the same database
        with httpx.Client(timeout=60) as http:  # the alias is served from the first request
            eagle = _generate(http, stack.inference, "eagle3").json()
        assert (eagle["drafter_version"], eagle["token_ids"]) == (f"{DRAFTER}@3", greedy)
        _stop_and_check_nothing_is_left(stack, signal.SIGINT)  # as Ctrl-C would
