"""docker-compose.yml, docker/ and .env.example checked against the code (no Docker engine needed).

``compose_problems`` reads the parsed compose file and lists what would break at run time:
- a command whose module, uvicorn factory or Celery app does not exist, or a trainer that does not
  consume the queue its settings name;
- an environment variable that is no field of the service's Settings class (the prefix picks the
  class: DRAFTOPD_REGISTRY_ -> RegistrySettings, ...), or a value that class refuses (``${VAR}``
  values are filled from .env.example, as compose would from a copied .env);
- an HTTP service without a healthcheck, or whose healthcheck URL is not a route of the app that
  ``create_app`` builds (the lifespan does not run: no model loads; Starlette's route matching
  decides) or not the port it serves;
  a shell healthcheck that reads a variable the container does not have;
- a ``depends_on`` on an unknown service or with an unknown condition, ``service_healthy`` on a
  service without a healthcheck, ``service_completed_successfully`` on a long-running one, or a
  dependency cycle;
- a GPU service (inference, rollout worker, trainer) without an NVIDIA reservation or set to run
  on the CPU, a torch service on the torch-free image, a missing Dockerfile, a COPY source that is
  missing or left out by the Dockerfile's .dockerignore, an undeclared named volume.

Each check is shown to fail: the tests break the parsed file on purpose and look for the report.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml
from celery import Celery
from fastapi import FastAPI
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from starlette.routing import Match

from services.inference.settings import InferenceSettings
from services.registry.settings import RegistrySettings
from services.rollout_worker.settings import RolloutWorkerSettings
from services.trainer.settings import TrainerSettings

REPO = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, type[BaseSettings]] = {
    "registry": RegistrySettings,
    "inference": InferenceSettings,
    "rollout_worker": RolloutWorkerSettings,
    "trainer": TrainerSettings,
}
GPU_KINDS = ("inference", "rollout_worker", "trainer")
STANDARD_ENV = re.compile(r"^(POSTGRES_\w+|HF_\w+|NVIDIA_\w+|PYTHON\w+|OMP_NUM_THREADS|HOSTNAME)$")
LIBRARY_ENV = ("DRAFTOPD_CACHE_DIR",)  # read by the library (draftopd.models.target)
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)")


# -- reading the files ---------------------------------------------------------------------------
def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``; ``$$`` is a ``$``."""

    def one(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if name in variables:
            return variables[name]
        if operator in (":-", "-"):
            return str(default)
        raise ValueError(f"${{{name}}} has no value in .env.example and no default")

    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(x) for x in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(str(item).partition("=")[::2] for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def option(argv: list[str], *names: str) -> str | None:
    for index, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[index + 1]
    return None


# -- commands ------------------------------------------------------------------------------------
@dataclass
class Entrypoint:
    """What a service's command runs."""

    kind: str | None = None  # a key of SETTINGS; None: not one of ours
    http_port: int | None = None  # uvicorn's --port
    queues: list[str] = field(default_factory=list)  # a Celery worker's -Q
    worker_name: str | None = None  # a Celery worker's --hostname
    server: bool = False  # runs until stopped (uvicorn, a Celery worker)
    problems: list[str] = field(default_factory=list)


def _kind(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "services" and parts[1] in SETTINGS else None


def _import(module: str, problems: list[str], what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        problems.append(f"{what}: cannot import {module!r} ({err})")
        return None


def analyse_command(name: str, argv: list[str]) -> Entrypoint:
    if argv[:2] in (["python", "-m"], ["python3", "-m"]):
        runner, rest = argv[2], argv[3:]
    elif argv:
        runner, rest = argv[0], argv[1:]
    else:
        return Entrypoint(problems=[f"{name}: no command (the image's default is not checked)"])
    if runner == "uvicorn":
        return _uvicorn(name, rest)
    if runner == "celery":
        return _celery(name, rest)
    if argv[:2] in (["python", "-m"], ["python3", "-m"]):
        return _module_main(name, runner)
    return Entrypoint(problems=[f"{name}: command {argv} is not python -m, uvicorn or celery"])


def _module_main(name: str, module: str) -> Entrypoint:
    entry = Entrypoint(kind=_kind(module))
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        entry.problems.append(f"{name}: module {module!r} (python -m) does not exist")
    elif 'if __name__ == "__main__":' not in Path(spec.origin).read_text():
        entry.problems.append(f"{name}: module {module!r} cannot run with python -m")
    return entry


def _uvicorn(name: str, args: list[str]) -> Entrypoint:
    target = next((arg for arg in args if ":" in arg and not arg.startswith("-")), None)
    entry = Entrypoint(http_port=int(option(args, "--port") or 8000), server=True)
    if target is None:
        entry.problems.append(f"{name}: uvicorn is given no MODULE:ATTRIBUTE")
        return entry
    module_name, _, attribute = target.partition(":")
    entry.kind = _kind(module_name)
    module = _import(module_name, entry.problems, name)
    if module is None:
        return entry
    app = getattr(module, attribute, None)
    if app is None:
        entry.problems.append(f"{name}: {module_name} has no {attribute!r} (uvicorn {target})")
    elif "--factory" in args:
        required = [
            p
            for p in inspect.signature(app).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            entry.problems.append(f"{name}: factory {target} needs arguments {required}")
    elif not isinstance(app, FastAPI):
        entry.problems.append(f"{name}: {target} is not an app (pass --factory for a factory)")
    return entry


def _celery(name: str, args: list[str]) -> Entrypoint:
    entry = Entrypoint(kind="trainer", server="worker" in args)
    path = option(args, "-A", "--app")
    if path is None or "worker" not in args:
        entry.problems.append(f"{name}: expected `celery -A APP worker ...`, got {args}")
        return entry
    module_name, _, attribute = path.partition(":")
    entry.kind = _kind(module_name)
    module = _import(module_name, entry.problems, name)
    if module is None:
        return entry
    candidates = [attribute] if attribute else ["app", "celery"]
    apps = [getattr(module, a) for a in candidates if isinstance(getattr(module, a, None), Celery)]
    if not apps:
        entry.problems.append(f"{name}: {path} holds no Celery app (looked for {candidates})")
    entry.queues = (option(args, "-Q", "--queues") or "celery").split(",")
    entry.worker_name = option(args, "-n", "--hostname")
    return entry


# -- environment ---------------------------------------------------------------------------------
def environment_problems(
    name: str, entry: Entrypoint, env: dict[str, str]
) -> tuple[BaseSettings | None, list[str]]:
    """Check every variable against the Settings classes; build the service's settings."""
    problems, fields = [], {}
    for key, value in env.items():
        if STANDARD_ENV.match(key) or key in LIBRARY_ENV:
            continue
        owner = next(
            (k for k, cls in SETTINGS.items() if key.startswith(cls.model_config["env_prefix"])),
            None,
        )
        if owner is None:
            problems.append(f"{name}: {key} is not a setting of any service")
            continue
        cls = SETTINGS[owner]
        field_name = key[len(cls.model_config["env_prefix"]) :].lower()
        if owner != entry.kind:
            problems.append(f"{name}: {key} is a {cls.__name__} setting, but {name} runs "
                            f"{entry.kind or 'none of the services'}")  # fmt: skip
        elif field_name not in cls.model_fields:
            problems.append(f"{name}: {key} is not a field of {cls.__name__}")
        else:
            fields[field_name] = value
    if entry.kind is None or problems:
        return None, problems
    try:
        return SETTINGS[entry.kind].model_validate(fields), problems
    except ValidationError as err:
        return None, [f"{name}: {SETTINGS[entry.kind].__name__} refuses its environment: {err}"]


# -- healthchecks --------------------------------------------------------------------------------
@functools.cache
def service_app(kind: str) -> FastAPI:
    """``kind``'s app as ``create_app`` builds it (its lifespan never runs: no model loads)."""
    from services.inference.main import create_app as inference_app
    from services.registry.main import create_app as registry_app
    from services.rollout_worker.main import create_app as rollout_app

    factories: dict[str, Callable[[], FastAPI]] = {
        "registry": lambda: registry_app(
            RegistrySettings(database_url="sqlite://", artifact_dir=Path(tempfile.gettempdir()))
        ),
        "inference": lambda: inference_app(InferenceSettings(target="smollm2")),
        "rollout_worker": lambda: rollout_app(RolloutWorkerSettings()),
    }
    return factories[kind]()


def serves_get(kind: str, path: str) -> bool:
    """Whether one of the app's routes answers ``GET path`` (Starlette's own route matching)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in service_app(kind).routes)


def healthcheck_problems(
    name: str,
    service: dict[str, Any],
    entry: Entrypoint,
    env: dict[str, str],
    variables: dict[str, str],
) -> list[str]:
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return [f"{name}: no healthcheck"] if entry.http_port is not None else []
    test = check.get("test")
    words = [str(w) for w in test] if isinstance(test, list) else ["CMD-SHELL", str(test)]
    text = interpolate(" ".join(words), variables)  # as compose does: $$VAR -> $VAR
    urls = re.findall(r"https?://[^\s'\"]+", text)
    problems = []
    if entry.http_port is not None and not urls:
        problems.append(f"{name}: its healthcheck calls no URL ({text!r})")
    for url in urls:
        parts = urlsplit(url)
        http_kind = entry.kind in SETTINGS and entry.kind != "trainer"
        if http_kind and not serves_get(str(entry.kind), parts.path):
            problems.append(f"{name}: healthcheck path {parts.path} is not a route of the "
                            f"{entry.kind} app")  # fmt: skip
        if parts.port != entry.http_port:
            problems.append(f"{name}: healthcheck port {parts.port} is not the served port "
                            f"{entry.http_port}")  # fmt: skip
    if words[0] == "CMD-SHELL":
        for variable in SHELL_VARIABLE.findall(text):
            if variable not in env and not STANDARD_ENV.match(variable):
                problems.append(f"{name}: healthcheck reads ${variable}, which is not set")
    if entry.worker_name and "inspect ping" in text:
        destination = re.search(r"--destination\W+(\w+)@", text)
        if destination is None or destination.group(1) != entry.worker_name.split("@")[0]:
            problems.append(f"{name}: healthcheck pings another worker than {entry.worker_name}")
    return problems


# -- dependencies, GPUs, images, volumes ----------------------------------------------------------
def depends_problems(
    name: str, service: dict[str, Any], services: dict[str, Any], entries: dict[str, Entrypoint]
) -> list[str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {dep: {"condition": "service_started"} for dep in deps}
    problems = []
    for dep, spec in deps.items():
        condition = (spec or {}).get("condition", "service_started")
        if dep not in services:
            problems.append(f"{name}: depends on {dep!r}, which is not a service")
        elif condition not in CONDITIONS:
            problems.append(f"{name}: depends on {dep} with unknown condition {condition!r}")
        elif condition == "service_healthy" and not services[dep].get("healthcheck"):
            problems.append(f"{name}: waits for {dep} to be healthy, but it has no healthcheck")
        elif condition == "service_completed_successfully" and (
            entries[dep].server or services[dep].get("restart", "no") != "no"
        ):
            problems.append(f"{name}: waits for {dep} to complete, but {dep} keeps running")
    return problems


def cycle_problems(services: dict[str, Any]) -> list[str]:
    def deps(name: str) -> list[str]:
        found = services[name].get("depends_on") or {}
        return [d for d in found if d in services]

    def visit(name: str, path: tuple[str, ...]) -> Iterator[str]:
        if name in path:
            yield "dependency cycle: " + " -> ".join([*path[path.index(name) :], name])
            return
        for dep in deps(name):
            yield from visit(dep, (*path, name))

    return sorted({problem for name in services for problem in visit(name, ())})


def gpu_problems(name: str, service: dict[str, Any], settings: BaseSettings | None) -> list[str]:
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    problems = []
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append(f"{name}: no NVIDIA GPU reservation (deploy.resources.reservations)")
    device = getattr(settings, "device", "cuda")
    if not str(device).startswith("cuda"):
        problems.append(f"{name}: reserves a GPU but runs on {device!r}")
    return problems


def dockerignored(path: str, ignore_file: Path) -> bool:
    """Whether the .dockerignore leaves ``path`` out (last matching pattern wins; a pattern
    matches the path or one of its parent directories)."""
    if not ignore_file.is_file():
        return False
    candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
    ignored = False
    for line in ignore_file.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def image_problems(name: str, service: dict[str, Any], entry: Entrypoint, repo: Path) -> list[str]:
    build = service.get("build")
    if build is None:
        return []
    build = {"context": build} if isinstance(build, str) else build
    context = repo / build.get("context", ".")
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    if not dockerfile.is_file():
        return [f"{name}: Dockerfile {dockerfile} does not exist"]
    text = dockerfile.read_text()
    problems = []
    if entry.kind in GPU_KINDS and not re.search(r"pip install[^\n]*\btorch==", text):
        problems.append(f"{name}: runs {entry.kind} (torch) on {dockerfile.name}, which has none")
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words[1:-1] if not w.startswith("--")]:
            if not (context / source).exists():
                problems.append(f"{name}: {dockerfile.name} copies {source}, which does not exist")
            elif dockerignored(source.rstrip("/"), ignore):
                problems.append(f"{name}: {dockerfile.name} copies {source}, but {ignore.name} "
                                "leaves it out")  # fmt: skip
    return problems


def volume_problems(name: str, service: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    problems = []
    for volume in service.get("volumes") or []:
        source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":")[0]
        if source and not source.startswith((".", "/", "~")) and source not in declared:
            problems.append(f"{name}: volume {source!r} is not declared under volumes:")
    return problems


# -- everything ----------------------------------------------------------------------------------
def compose_problems(
    compose: dict[str, Any], variables: dict[str, str], *, repo: Path = REPO
) -> list[str]:
    """Everything that would break (see the module docstring); [] for a good file. ``repo`` is
    where the build contexts are."""
    services: dict[str, Any] = compose.get("services") or {}
    declared = compose.get("volumes") or {}
    entries = {
        name: analyse_command(name, [interpolate(w, variables) for w in command_of(service)])
        if service.get("build")
        else Entrypoint(server=service.get("restart", "no") != "no")
        for name, service in services.items()
    }
    problems = cycle_problems(services)
    for name, service in services.items():
        entry = entries[name]
        env = {k: interpolate(v, variables) for k, v in environment_of(service).items()}
        settings, env_problems = environment_problems(name, entry, env)
        problems += entry.problems + env_problems
        if entry.kind == "trainer" and settings is not None:
            queue = getattr(settings, "queue", None)
            if queue not in entry.queues:
                problems.append(f"{name}: consumes {entry.queues}, not the settings' queue {queue}")
        problems += healthcheck_problems(name, service, entry, env, variables)
        problems += depends_problems(name, service, services, entries)
        if entry.kind in GPU_KINDS:
            problems += gpu_problems(name, service, settings)
        problems += image_problems(name, service, entry, repo)
        problems += volume_problems(name, service, declared)
    return problems


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_the_compose_file_matches_the_code(compose: dict[str, Any]) -> None:
    assert compose_problems(compose, env_example()) == []
    assert set(compose["services"]) == {
        "postgres", "redis", "migrate", "registry", "inference", "rollout-worker", "trainer",
    }  # fmt: skip


def test_env_example_documents_exactly_the_variables_compose_reads() -> None:
    used = set(INTERPOLATION.findall((REPO / "docker-compose.yml").read_text()))
    assert {name for name, _, _ in used} == set(env_example())


def test_the_gpu_image_pins_torch_and_the_registry_image_has_none() -> None:
    gpu = (REPO / "docker/gpu.Dockerfile").read_text()
    registry = (REPO / "docker/registry.Dockerfile").read_text()
    assert "pip install torch==2.13.0" in gpu
    assert "optional-dependencies']['registry']" in registry
    assert not re.search(r"pip install[^\n]*\btorch", registry)


def _isolated(compose: dict[str, Any]) -> dict[str, Any]:
    """A deep copy without YAML-anchor aliasing (a change touches one service only)."""
    copied: dict[str, Any] = json.loads(json.dumps(compose))
    return copied


def _set_command_word(service: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        command = c["services"][service]["command"]
        command[command.index(old)] = new

    return change


def _set_env(service: str, key: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        c["services"][service]["environment"][key] = value

    return change


def _set_health_url(service: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        test = c["services"][service]["healthcheck"]["test"]
        c["services"][service]["healthcheck"]["test"] = [w.replace(old, new) for w in test]

    return change


def _depend(service: str, dep: str, condition: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        c["services"][service].setdefault("depends_on", {})[dep] = {"condition": condition}

    return change


def _drop(service: str, key: str) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        del c["services"][service][key]

    return change


def _set(service: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        c["services"][service][key] = value

    return change


BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a misspelt app module": (
        _set_command_word(
            "registry", "services.registry.main:create_app", "services.registry.mian:create_app"
        ),
        "registry: cannot import 'services.registry.mian'",
    ),
    "a missing factory": (
        _set_command_word(
            "inference", "services.inference.main:create_app", "services.inference.main:make_app"
        ),
        "inference: services.inference.main has no 'make_app'",
    ),
    "a factory served as an app": (
        _set_command_word("rollout-worker", "--factory", "--no-access-log"),
        "rollout-worker: services.rollout_worker.main:create_app is not an app",
    ),
    "a missing migration module": (
        _set_command_word("migrate", "services.registry.migrate", "services.registry.migrations"),
        "migrate: module 'services.registry.migrations' (python -m) does not exist",
    ),
    "a module that cannot run with -m": (
        _set_command_word("migrate", "services.registry.migrate", "services.registry.db"),
        "migrate: module 'services.registry.db' cannot run with python -m",
    ),
    "a wrong Celery app": (
        _set_command_word("trainer", "services.trainer.celery_app", "services.trainer.settings"),
        "trainer: services.trainer.settings holds no Celery app",
    ),
    "a worker on another queue": (
        _set_command_word("trainer", "train", "training"),
        "trainer: consumes ['training'], not the settings' queue train",
    ),
    "a healthcheck on a missing route": (
        _set_health_url("registry", "/health", "/healthz"),
        "registry: healthcheck path /healthz is not a route of the registry app",
    ),
    "a healthcheck on another port": (
        _set_health_url("inference", ":8001/", ":8002/"),
        "inference: healthcheck port 8002 is not the served port 8001",
    ),
    "no healthcheck on an HTTP service": (
        _drop("rollout-worker", "healthcheck"),
        "rollout-worker: no healthcheck",
    ),
    "a shell healthcheck reading an unset variable": (
        _set_health_url("trainer", "DRAFTOPD_TRAINER_REDIS_URL", "DRAFTOPD_TRAINER_BROKER"),
        "trainer: healthcheck reads $DRAFTOPD_TRAINER_BROKER, which is not set",
    ),
    "a healthcheck pinging another worker": (
        _set_health_url("trainer", "trainer@$$HOSTNAME", "worker@$$HOSTNAME"),
        "trainer: healthcheck pings another worker than trainer@%h",
    ),
    "a misspelt setting": (
        _set_env("inference", "DRAFTOPD_INFERENCE_TARGETT", "smollm2"),
        "inference: DRAFTOPD_INFERENCE_TARGETT is not a field of InferenceSettings",
    ),
    "another service's setting": (
        _set_env("trainer", "DRAFTOPD_ROLLOUT_TARGET", "smollm2"),
        "trainer: DRAFTOPD_ROLLOUT_TARGET is a RolloutWorkerSettings setting, but trainer runs",
    ),
    "an unknown variable": (
        _set_env("registry", "DRAFTOPD_REGISTY_API_TOKEN", "x"),
        "registry: DRAFTOPD_REGISTY_API_TOKEN is not a setting of any service",
    ),
    "a value the settings refuse": (
        _set_env("inference", "DRAFTOPD_INFERENCE_DTYPE", "fp8"),
        "inference: InferenceSettings refuses its environment",
    ),
    "a GPU service on the CPU": (
        _set_env("rollout-worker", "DRAFTOPD_ROLLOUT_DEVICE", "cpu"),
        "rollout-worker: reserves a GPU but runs on 'cpu'",
    ),
    "no GPU reservation": (_drop("trainer", "deploy"), "trainer: no NVIDIA GPU reservation"),
    "a dependency on a missing service": (
        _depend("registry", "migration", "service_completed_successfully"),
        "registry: depends on 'migration', which is not a service",
    ),
    "an unknown condition": (
        _depend("registry", "migrate", "service_done"),
        "registry: depends on migrate with unknown condition 'service_done'",
    ),
    "healthy without a healthcheck": (
        _depend("inference", "migrate", "service_healthy"),
        "inference: waits for migrate to be healthy, but it has no healthcheck",
    ),
    "completed on a server": (
        _depend("trainer", "registry", "service_completed_successfully"),
        "trainer: waits for registry to complete, but registry keeps running",
    ),
    "a dependency cycle": (
        _depend("redis", "inference", "service_started"),
        "dependency cycle: ",
    ),
    "torch on the torch-free image": (
        _set("inference", "build", {"context": ".", "dockerfile": "docker/registry.Dockerfile"}),
        "inference: runs inference (torch) on registry.Dockerfile, which has none",
    ),
    "a missing Dockerfile": (
        _set("registry", "build", {"context": ".", "dockerfile": "docker/nope.Dockerfile"}),
        "registry: Dockerfile",
    ),
    "an undeclared volume": (
        _set("inference", "volumes", ["model-cash:/cache"]),
        "inference: volume 'model-cash' is not declared",
    ),
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_a_broken_compose_file_is_reported(compose: dict[str, Any], what: str) -> None:
    change, expected = BREAKS[what]
    broken = _isolated(compose)
    change(broken)
    problems = compose_problems(broken, env_example())
    assert any(expected in problem for problem in problems), problems


def test_a_dockerfile_copying_what_its_dockerignore_leaves_out_is_reported(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    dockerfile = tmp_path / "docker/registry.Dockerfile"
    dockerfile.parent.mkdir()
    dockerfile.write_text((REPO / "docker/registry.Dockerfile").read_text())
    ignore = (REPO / "docker/registry.Dockerfile.dockerignore").read_text()
    dockerfile.with_name("registry.Dockerfile.dockerignore").write_text(
        ignore.replace("!migrations/\n", "")
    )
    for source in ("pyproject.toml", "alembic.ini", "migrations", "shared", "services"):
        (tmp_path / source).symlink_to(REPO / source)
    problems = compose_problems(_isolated(compose), env_example(), repo=tmp_path)
    expected = "copies migrations, but registry.Dockerfile.dockerignore leaves it out"
    assert {p for p in problems if expected in p} == {
        f"{s}: registry.Dockerfile {expected}" for s in ("migrate", "registry")
    }


# -- the torch-free registry image -----------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def registry_imports() -> set[str]:
    """Top-level third-party modules imported by the registry, its migrations and the draftopd
    modules they reach; a service other than the registry is reported as ``services.<name>``."""
    files = [*(REPO / "services/registry").glob("*.py"), *(REPO / "migrations").rglob("*.py")]
    seen, third_party = set(), set()
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            top = module.split(".")[0]
            if top == "draftopd":
                parts = module.split(".")
                for end in range(1, len(parts) + 1):  # the packages' __init__ run too
                    spec = importlib.util.find_spec(".".join(parts[:end]))
                    if spec is not None and spec.origin is not None:
                        files.append(Path(spec.origin))
            elif top == "services":
                if not module.startswith("services.registry") and module != "services":
                    third_party.add(module)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions that installing ``requirements`` brings (as installed here)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            needs = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        extras = requirement.extras or {""}
        for line in needs:
            need = Requirement(line)
            if need.marker is None or any(need.marker.evaluate({"extra": e}) for e in extras):
                todo.append(need)
    return {name for name, _ in seen}


def test_the_registry_extra_covers_every_import_of_the_registry() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["registry"]
    closure = requirement_closure(extra)
    distributions = importlib.metadata.packages_distributions()
    imports = registry_imports()
    assert {"fastapi", "sqlalchemy", "alembic", "celery", "redis"} <= imports
    not_covered = {
        module: distributions.get(module)
        for module in imports
        if not any(canonicalize_name(d) in closure for d in distributions.get(module, []))
    }
    assert not_covered == {}
    named = {canonicalize_name(Requirement(r).name) for r in extra}
    # imported by name at run time: psycopg for postgresql:// URLs, multipart for File/Form
    assert {"psycopg", "python-multipart"} <= named
    assert "torch" not in closure and "transformers" not in closure
