"""Request latency of the inference service with and without registry alias flips (hot swaps).

Starts a registry (SQLite in a temporary directory, uvicorn in a thread of this process) holding two
drafter versions, and the inference service as a subprocess following its alias ``production``
through Redis pub/sub. Then, with the same clients and prompts, two phases run side by side:
``steady`` (no flips) and ``flipping`` (the alias flips between the two versions every
``--flip-every`` seconds). Prints requests, failures, p50/p99 latency and the versions served.

    .venv/bin/python docs/experiments/hot_swap_bench.py                    # tiny random target
    .venv/bin/python docs/experiments/hot_swap_bench.py --target smollm2 \\
        --drafters runs/a/checkpoints/step-00000100 runs/a/checkpoints/step-00000200

Not run in CI. Without ``--drafters`` the two versions are random drafters (seeds 1 and 2).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn
from pydantic import SecretStr

from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import load_target
from draftopd.models.tiny import build_tiny_target
from draftopd.wire.registry_client import RegistryClient
from services.registry.main import create_app
from services.registry.migrate import upgrade_head
from services.registry.settings import RegistrySettings

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bench-token"
NAME = "hot-swap-bench"
PROMPTS = [
    "The quick brown fox",
    "Beautiful is better than ugly.",
    "def add(a, b):",
    "Speculative decoding lets a small draft model",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_registry(work: Path, redis_url: str) -> tuple[str, uvicorn.Server]:
    database = f"sqlite:///{work / 'registry.db'}"
    upgrade_head(database)
    settings = RegistrySettings(
        database_url=database,
        artifact_dir=work / "artifacts",
        api_token=SecretStr(TOKEN),
        redis_url=redis_url,
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, name="registry", daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def _versions(args: argparse.Namespace, work: Path) -> tuple[str, list[Path]]:
    """(the target spec, two drafter checkpoint directories)."""
    target_spec = args.target
    if target_spec == "tiny":
        target_spec = str(build_tiny_target(work / "tiny-target"))
    if args.drafters:
        return target_spec, [Path(d) for d in args.drafters]
    target = load_target(target_spec)
    dirs = [save_drafter(random_drafter_for(target, seed=s), work / f"seed{s}") for s in (1, 2)]
    return target_spec, dirs


def _start_inference(
    args: argparse.Namespace, target: str, registry: str, work: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}:{REPO / 'shared'}",
        "DRAFTOPD_INFERENCE_TARGET": target,
        "DRAFTOPD_INFERENCE_REGISTRY_URL": registry,
        "DRAFTOPD_INFERENCE_DRAFTER_NAME": NAME,
        "DRAFTOPD_INFERENCE_REDIS_URL": args.redis_url,
        "DRAFTOPD_INFERENCE_ARTIFACT_CACHE_DIR": str(work / "cache"),
        "DRAFTOPD_INFERENCE_MAX_CONCURRENCY": str(args.clients),
        "DRAFTOPD_INFERENCE_TORCH_THREADS": str(args.threads),
        "DRAFTOPD_INFERENCE_PORT": str(port),
    }
    log = (work / "inference.log").open("wb")
    cmd = [sys.executable, "-m", "services.inference.main"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health").json()["drafter_version"]:
                return base, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"inference did not start; see {work / 'inference.log'}")


def _phase(args: argparse.Namespace, base: str, flip: RegistryClient | None) -> dict[str, object]:
    """Run ``args.requests`` greedy requests over ``args.clients`` threads (flipping if asked)."""
    latencies: list[float] = []
    versions: list[str] = []
    failures: list[int] = []
    done = threading.Event()

    def one(i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": args.max_new_tokens}
        start = time.perf_counter()
        response = httpx.post(f"{base}/generate", json=body, timeout=600)
        if response.status_code != 200:
            failures.append(response.status_code)
            return
        latencies.append(time.perf_counter() - start)
        versions.append(response.json()["drafter_version"])

    def flipper() -> None:
        assert flip is not None
        flips = 0
        while not done.wait(args.flip_every):
            flips += 1
            flip.put_alias(NAME, "production", 2 if flips % 2 else 1)
        flip.put_alias(NAME, "production", 1)

    thread = threading.Thread(target=flipper, daemon=True) if flip is not None else None
    if thread is not None:
        thread.start()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    done.set()
    if thread is not None:
        thread.join()
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    served = {v: versions.count(v) for v in sorted(set(versions))}
    return {"n": len(latencies), "failures": len(failures), "p50": cuts[49], "p99": cuts[98],
            "versions": served}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="tiny", help="'tiny' (built here), 'smollm2' or a path")
    p.add_argument("--drafters", nargs=2, help="two checkpoint dirs (default: random drafters)")
    p.add_argument("--requests", type=int, default=64, help="requests per phase")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--flip-every", type=float, default=0.5, help="seconds between alias flips")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hot-swap-bench-") as tmp:
        work = Path(tmp)
        registry_url, registry_server = _start_registry(work, args.redis_url)
        target, dirs = _versions(args, work)
        with RegistryClient(registry_url, token=TOKEN) as registry:
            registry.create_drafter(NAME, target_model=args.target)
            for directory in dirs:
                registry.upload_version(NAME, directory)
            registry.put_alias(NAME, "production", 1)
            base, server = _start_inference(args, target, registry_url, work)
            try:
                _phase(args, base, None)  # warm-up: both phases start from a warm server
                rows = {
                    "steady": _phase(args, base, None),
                    "flipping": _phase(args, base, registry),
                }
                swaps = httpx.get(f"{base}/health").json()["registry"]["swaps"]
            finally:
                server.terminate()
                server.wait(30)
        registry_server.should_exit = True
    print(f"{'phase':<10} {'requests':>8} {'failed':>6} {'p50 s':>8} {'p99 s':>8}  versions")
    for phase, row in rows.items():
        print(f"{phase:<10} {row['n']:>8} {row['failures']:>6} {row['p50']:>8.3f} "
              f"{row['p99']:>8.3f}  {row['versions']}")  # fmt: skip
    print(f"swaps done by the server: {swaps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
