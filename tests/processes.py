"""Services as real child processes, for the integration tests: free ports, the environment they
need (PYTHONPATH to the checkout), logs, and waits that show the logs when they time out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all bound at once, so the kernel cannot hand out one port twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def service_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'shared'}", **extra}


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def uvicorn_argv(factory: str, port: int) -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", "--factory", factory]
    return [*argv, "--host", "127.0.0.1", "--port", str(port)]


def celery_argv() -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "services.trainer.celery_app", "worker"]
    return [*argv, "-Q", "train", "--pool", "solo", "--loglevel", "INFO", "--without-gossip"]


def log_tails(logs: list[Path], chars: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in logs if p.exists())


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, logs: list[Path], poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log_tails(logs)}")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], logs: list[Path], timeout: float) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited with {proc.returncode}\n{log_tails(logs)}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, f"{url}/health", logs, poll=0.2)


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
