"""The ``draftopd`` command line (DESIGN.md §5).

Subcommands:
- ``bench``: the benchmark protocol (DESIGN.md §6, ``draftopd.bench``);
- ``serve``: the inference service in the foreground (uvicorn, replacing this process);
- ``up``: the local stack as supervised child processes (for now: the inference service only);
- ``train sft|opd|curve``: training from the command line (``draftopd.cli_train``).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its flags and sets
``handler``; add ``jobs`` the same way and list them in ``SUBCOMMANDS``. The library
never imports a service: services are started as ``python -m uvicorn <module>:create_app``.
Heavy imports (torch, transformers) happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from draftopd.cli_args import CommandError, Subparsers
from draftopd.cli_train import add_train

logger = logging.getLogger(__name__)

INFERENCE_APP = "services.inference.main:create_app"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STARTUP_TIMEOUT_S = 600.0  # the first start may convert the SmolLM2 GGUF (tens of seconds)
STOP_TIMEOUT_S = 10.0  # grace period after SIGTERM before a child is killed


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftopd", description="Train and serve speculative-decoding drafters (Draft-OPD)."
    )
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except (ValueError, CommandError) as err:
        logger.debug("%s failed", args.command, exc_info=True)
        status = 2 if isinstance(err, ValueError) else 1
        parser.exit(status, f"draftopd {args.command}: error: {err}\n")


def configure_logging(level: str) -> None:
    """Configure logging once, for the whole process (stderr; stdout is for results)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger().setLevel(level)


# -- bench --------------------------------------------------------------------------------------
def _drafter_arg(value: str) -> str:
    """argparse type for --drafter: a checkpoint directory or random:SEED."""
    from draftopd.bench import parse_drafter_ref

    try:
        parse_drafter_ref(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


def _add_bench(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark plain vs speculative decoding (DESIGN §6)")
    p.add_argument("--prompts", help="JSONL prompt file (default: MT-Bench question.jsonl)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="M (default 128)")
    p.add_argument("--method", choices=("eagle3", "ngram", "none"), default="eagle3")
    p.add_argument(
        "--drafter",
        type=_drafter_arg,
        help="eagle3 drafter: a checkpoint directory or random:SEED (default random:0)",
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="K (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--json", help="write the JSON report to this path ('-' = stdout)")
    p.add_argument("--peers", action="store_true", help="also time Hugging Face generate")
    p.add_argument("--target", default="smollm2", help="target: smollm2, a directory or a .gguf")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every path N times per prompt (order rotated) and keep the fastest (default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=_run_bench_command)


def _run_bench_command(args: argparse.Namespace) -> int:
    from draftopd.bench import BenchConfig, format_summary, run_bench, write_report

    config = BenchConfig(
        prompts=args.prompts,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        drafter=args.drafter,
        num_draft_tokens=args.num_draft_tokens,
        temperature=args.temperature,
        peers=args.peers,
        target=args.target,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        threads=args.threads,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    report = run_bench(config)
    if args.json == "-":
        import json

        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif args.json:
        logger.info("wrote %s", write_report(report, args.json))
    sys.stdout.write(format_summary(report))
    return 0


# -- serve --------------------------------------------------------------------------------------
def _add_host_port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def _add_serve(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the inference service in the foreground")
    _add_host_port(p)
    p.set_defaults(handler=_run_serve_command)


def uvicorn_command(app: str, *, host: str, port: int, log_level: str = "info") -> list[str]:
    """The argv that serves ``module:create_app`` (a factory) with uvicorn."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        log_level.lower(),
    ]


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as err:
            raise CommandError(
                f"cannot listen on {host}:{port} ({err.strerror}): is another server (or "
                "`draftopd up`) already running there? Stop it or choose another --port"
            ) from err


def _run_serve_command(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)
    argv = uvicorn_command(INFERENCE_APP, host=args.host, port=args.port, log_level=args.log_level)
    logger.info("exec %s", " ".join(argv))
    os.execvp(argv[0], argv)  # replaces this process; returns only on failure (OSError)


# -- up -----------------------------------------------------------------------------------------
@dataclass
class ChildService:
    """One service of the local stack, run as a child process and checked through /health."""

    name: str  # shown in logs
    argv: list[str]  # the command that runs it
    url: str  # its base URL, e.g. http://127.0.0.1:8000
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables
    process: subprocess.Popen[bytes] | None = None  # set by start()

    def start(self) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        # its own session: Ctrl-C reaches only us, and we stop children in order
        self.process = subprocess.Popen(
            self.argv, env={**os.environ, **self.env}, start_new_session=True
        )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            code = self.exit_code()
            if code is not None:
                raise CommandError(f"{self.name} exited with code {code} before it was healthy")
            if time.monotonic() > deadline:
                raise CommandError(
                    f"{self.name} not healthy at {self.url}/health after {timeout_s:.0f} s"
                )
            time.sleep(0.5)
        logger.info("%s is up at %s", self.name, self.url)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        logger.info("stopping %s (pid %d)", self.name, self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_stack(
    services: list[ChildService],
    *,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Start the services, wait for their /health, and supervise them until Ctrl-C or SIGTERM.

    Returns 0 after a requested stop and 1 when a service dies on its own; stops every child
    (in reverse start order) either way.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for service in services:
            service.start()
            service.wait_healthy(startup_timeout_s)
        if on_ready is not None:
            on_ready()
        return _supervise(services)
    except KeyboardInterrupt:
        logger.info("stop requested; shutting down")
        return 0
    finally:
        for service in reversed(services):
            service.stop()
        signal.signal(signal.SIGTERM, previous)


def _supervise(services: list[ChildService]) -> int:
    while True:
        for service in services:
            code = service.exit_code()
            if code is not None:
                logger.error("%s exited unexpectedly with code %d", service.name, code)
                return 1
        time.sleep(0.5)


def _add_up(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("up", help="start the local stack (for now: the inference service)")
    _add_host_port(p)
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT_S,
        help="seconds to wait for each service's /health",
    )
    p.set_defaults(handler=_run_up_command)


def _run_up_command(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    argv = uvicorn_command(INFERENCE_APP, host=args.host, port=args.port, log_level=args.log_level)
    inference = ChildService(
        name="inference",
        argv=argv,
        url=url,
        env=_repo_pythonpath(),
    )
    return run_stack(
        [inference], startup_timeout_s=args.startup_timeout, on_ready=lambda: _announce(url)
    )


def _repo_pythonpath() -> dict[str, str]:
    """In a source checkout, put its root on PYTHONPATH so the child can import ``services``."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "services").is_dir():
        return {}
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{repo}{os.pathsep}{current}" if current else str(repo)}


def _announce(url: str) -> None:
    logger.info("draftopd is up. inference: %s  (API docs: %s/docs)", url, url)
    logger.info(
        "try: curl -s %s/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "Write a haiku about the sea.", "max_new_tokens": 64}\'',
        url,
    )
    logger.info("press Ctrl-C to stop")


SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_bench,
    _add_serve,
    _add_up,
    add_train,
)


if __name__ == "__main__":
    sys.exit(main())
