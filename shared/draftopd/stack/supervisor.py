"""Child processes supervised as one stack: the machinery under ``draftopd up`` (draftopd.stack.up).

A ``ChildService`` runs in its own session (so Ctrl-C reaches only the supervisor) with its output
in a log file. ``run_stack`` starts ``Stage``s in order (the services of one stage together, then
waits until all are ready), supervises them, and on Ctrl-C, SIGTERM or SIGHUP (or a child dying)
stops every child in reverse start order: SIGTERM to its process group, SIGKILL after
``STOP_TIMEOUT_S``, then SIGKILL to anything left in the group. A child that exits before it is
ready fails the start with the tail of its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from draftopd.cli.args import CommandError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # the first start may convert the SmolLM2 GGUF (tens of seconds)
STOP_TIMEOUT_S = 10.0  # grace period after SIGTERM before a child is killed
POLL_S = 0.5
LOG_TAIL_LINES = 25


# -- child processes ------------------------------------------------------------------------------
@dataclass
class ChildService:
    """One service of the local stack, run as a child process in its own process group."""

    name: str  # shown in logs
    argv: list[str]  # the command that runs it
    url: str  # its base URL (readiness: GET {url}/health answers 200 unless `ready` is given)
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables
    log_path: Path | None = None  # stdout and stderr go here (None: inherited)
    cwd: Path | None = None  # working directory (None: ours)
    ready: Callable[[], bool] | None = None  # readiness probe replacing GET /health
    process: subprocess.Popen[bytes] | None = None  # set by start()

    def start(self) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        log = None
        if self.log_path is not None:
            if self.log_path.exists():
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
            log = self.log_path.open("wb")
        try:  # its own session: Ctrl-C reaches only us, and we stop the children in order
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                start_new_session=True,
            )
        except OSError as err:
            raise CommandError(f"cannot start {self.name} ({self.argv[0]}): {err}") from err
        finally:
            if log is not None:
                log.close()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        if self.ready is not None:
            return self.ready()
        return http_ok(f"{self.url}/health")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join([f"--- last lines of {self.log_path}:", *text[-lines:]])

    def failure(self, problem: str) -> CommandError:
        return CommandError("\n".join(filter(None, [f"{self.name} {problem}", self.log_tail()])))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, self.process.pid)
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        self._signal_group(signal.SIGKILL)  # whatever it left behind in its process group

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is empty
            os.killpg(self.process.pid, signum)  # start_new_session: its pgid is its pid


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(services: Sequence[ChildService], timeout_s: float) -> None:
    """Wait until every service is ready; a service that exits first fails at once."""
    deadline = time.monotonic() + timeout_s
    waiting = list(services)
    while waiting:
        for service in list(waiting):
            code = service.exit_code()
            if code is not None:
                raise service.failure(f"exited with code {code} before it was ready")
            if service.healthy():
                logger.info("%s is up%s", service.name, f" at {service.url}" if service.url else "")
                waiting.remove(service)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise waiting[0].failure(f"not ready after {timeout_s:.0f} s (waiting for {names})")
        if waiting:
            time.sleep(POLL_S)


@dataclass
class Stage:
    """Services started together and waited for together; ``then`` runs once they are ready."""

    services: list[ChildService] = field(default_factory=list)
    then: Callable[[], None] | None = None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers


@contextmanager
def _signals(handler: Handler, signums: Sequence[int], *, keep_ignored: bool) -> Iterator[None]:
    """Handle ``signums`` with ``handler`` inside the block; with ``keep_ignored``, a signal that
    is ignored now stays ignored (``nohup`` ignores SIGHUP, a shell ignores SIGINT for a
    background job)."""
    if keep_ignored:
        signums = [s for s in signums if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_stack(
    stages: Sequence[Stage | ChildService],
    *,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Start the stages in order, then supervise until Ctrl-C, SIGTERM or SIGHUP.

    Returns 0 after a requested stop and 1 when a service dies on its own; stops every started
    child (in reverse start order) either way. A bare ChildService is a stage of its own."""
    started: list[ChildService] = []
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with _signals(_raise_interrupt, stop_signals, keep_ignored=True):
        try:
            for stage in stages:
                stage = stage if isinstance(stage, Stage) else Stage([stage])
                for service in stage.services:
                    started.append(service)
                    service.start()
                wait_ready(stage.services, startup_timeout_s)
                if stage.then is not None:
                    stage.then()
            if on_ready is not None:
                on_ready()
            return _supervise(started)
        except KeyboardInterrupt:
            logger.info("stop requested; shutting down")
            return 0
        finally:  # a second Ctrl-C must not leave children behind half-way through
            with _signals(signal.SIG_IGN, stop_signals, keep_ignored=False):
                for service in reversed(started):
                    service.stop()


def _supervise(services: list[ChildService]) -> int:
    while True:
        for service in services:
            code = service.exit_code()
            if code is not None:
                logger.error("%s", service.failure(f"exited unexpectedly with code {code}"))
                return 1
        time.sleep(POLL_S)


# -- ports -----------------------------------------------------------------------------------------
def check_port_free(host: str, port: int, *, flag: str = "--port") -> None:
    """Fail early and clearly when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as err:
            raise CommandError(
                f"cannot listen on {host}:{port} ({err.strerror}): is another server (or "
                f"`draftopd up`) already running there? Stop it or choose another {flag}"
            ) from err


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
