"""draftopd.cli: argument parsing, `bench --json`, clear errors, and the `up` supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from draftopd.bench import REPORT_KEYS
from draftopd.cli import app as cli
from draftopd.models.tiny import build_tiny_target
from draftopd.stack import supervisor
from tests.processes import free_port, free_ports

HEALTH_SERVER = """
import http.server, sys, threading, time

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(float(sys.argv[2]))  # lifetime, then exit on its own
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "target")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "The quick brown fox"}, {"turns": ["Write a poem about the sea."]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_parse_bench_arguments() -> None:
    args = cli.build_parser().parse_args(
        [
            "bench",
            "--prompts",
            "p.jsonl",
            "--limit",
            "5",
            "--max-new-tokens",
            "64",
            "--method",
            "ngram",
            "--num-draft-tokens",
            "6",
            "--temperature",
            "0.7",
            "--json",
            "o.json",
            "--peers",
            "--target",
            "t",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--seed",
            "3",
            "--threads",
            "1",
        ]
    )
    assert (args.command, args.prompts, args.limit) == ("bench", "p.jsonl", 5)
    assert args.max_new_tokens == 64
    assert (args.method, args.num_draft_tokens, args.temperature) == ("ngram", 6, 0.7)
    assert (args.json, args.peers, args.target, args.device) == ("o.json", True, "t", "cpu")
    assert (args.dtype, args.seed, args.threads, args.drafter) == ("bfloat16", 3, 1, None)


def test_parse_bench_defaults() -> None:
    args = cli.build_parser().parse_args(["bench", "--drafter", "random:4"])
    assert (args.method, args.max_new_tokens, args.num_draft_tokens) == ("eagle3", 128, 4)
    assert (args.temperature, args.target, args.peers, args.json) == (0.0, "smollm2", False, None)
    assert args.drafter == "random:4"


def test_bench_writes_json(
    tiny_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "bench.json"
    code = cli.main(
        [
            "bench",
            "--prompts",
            str(prompts_file),
            "--target",
            str(tiny_dir),
            "--method",
            "ngram",
            "--max-new-tokens",
            "8",
            "--num-draft-tokens",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(REPORT_KEYS) <= set(report)
    assert report["num_prompts"] == 2
    assert report["identical"] == 2
    assert len(report["acceptance_by_position"]) == 2
    assert "identical 2/2" in capsys.readouterr().out


def test_bogus_drafter_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--drafter", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--drafter" in err
    assert "neither a checkpoint directory nor random:SEED" in err


def test_drafter_with_another_method_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--method", "ngram", "--drafter", "random:1"])
    assert exc.value.code == 2
    assert "applies only to methods" in capsys.readouterr().err


def test_missing_prompts_file_is_a_clear_error(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--prompts", str(missing), "--target", str(tiny_dir)])
    assert exc.value.code == 2
    assert f"prompts file not found: {missing}" in capsys.readouterr().err


def test_up_with_port_in_use_is_a_clear_error(
    busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["up", "--port", str(busy_port)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err
    assert "choose another --inference-port" in err


def up_argv(tmp_path: Path, **ports: int) -> list[str]:
    """`draftopd up` on free ports (the ones given replace them) and a data dir under tmp_path."""
    argv = ["up", "--data-dir", str(tmp_path / "data")]
    free = free_ports(4)
    for name in ("inference", "rollout", "registry", "redis"):
        argv += [f"--{name}-port", str(ports.get(name) or free.pop())]
    return argv


def test_up_names_the_flag_of_a_busy_registry_port(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(up_argv(tmp_path, registry=busy_port))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err and "another --registry-port" in err
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_up_refuses_one_port_for_two_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    with pytest.raises(SystemExit) as exc:
        cli.main(up_argv(tmp_path, inference=port, rollout=port))
    assert exc.value.code == 1
    assert f"--inference-port and --rollout-port are both {port}" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["./missing-dir", "/nowhere/model.gguf", "{tmp}"])
def test_up_with_a_missing_target_is_a_clear_error(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = target.replace("{tmp}", str(tmp_path))  # a directory without config.json
    with pytest.raises(SystemExit) as exc:
        cli.main([*up_argv(tmp_path), "--target", target])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "target not found" in err and "pass --target smollm2" in err
    assert not (tmp_path / "data").exists()


def test_serve_execs_uvicorn_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_execvp(file: str, argv: list[str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", fake_execvp)
    port = free_port()
    with pytest.raises(SystemExit):
        cli.main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    assert calls == [
        [
            sys.executable,
            "-m",
            "uvicorn",
            "services.inference.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
        ]
    ]


def health_service(tmp_path: Path, *, lifetime_s: float) -> supervisor.ChildService:
    script = tmp_path / "health_server.py"
    script.write_text(HEALTH_SERVER)
    port = free_port()
    return supervisor.ChildService(
        name="fake",
        argv=[sys.executable, str(script), str(port), str(lifetime_s)],
        url=f"http://127.0.0.1:{port}",
    )


def test_run_stack_stops_children_on_sigterm(tmp_path: Path) -> None:
    service = health_service(tmp_path, lifetime_s=60)
    handler_before = signal.getsignal(signal.SIGTERM)
    ready: list[bool] = []

    def on_ready() -> None:
        ready.append(service.healthy())
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid of draftopd up>` would

    assert supervisor.run_stack([service], startup_timeout_s=30, on_ready=on_ready) == 0
    assert ready == [True]
    assert service.process is not None
    assert service.process.returncode == -signal.SIGTERM  # stopped by us, not by its lifetime
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handler restored


def test_run_stack_reports_a_child_that_dies(tmp_path: Path) -> None:
    service = health_service(tmp_path, lifetime_s=1.5)
    assert supervisor.run_stack([service], startup_timeout_s=30) == 1
    assert service.process is not None
    assert service.process.returncode == 0


def test_run_stack_child_failing_at_startup(tmp_path: Path) -> None:
    service = supervisor.ChildService(
        name="broken", argv=[sys.executable, "-c", "raise SystemExit(3)"], url="http://127.0.0.1:9"
    )
    with pytest.raises(cli.CommandError, match="broken exited with code 3"):
        supervisor.run_stack([service], startup_timeout_s=30)


def test_a_child_failing_at_startup_shows_the_end_of_its_log(tmp_path: Path) -> None:
    code = "import sys; print('loading the target'); sys.exit('target not found: /x')"
    service = supervisor.ChildService(
        name="inference",
        argv=[sys.executable, "-c", code],
        url="http://127.0.0.1:9",
        log_path=tmp_path / "inference.log",
    )
    with pytest.raises(cli.CommandError) as exc:
        supervisor.run_stack([service], startup_timeout_s=30)
    lines = str(exc.value).splitlines()
    assert lines[0] == "inference exited with code 1 before it was ready"
    assert lines[-2:] == ["loading the target", "target not found: /x"]


LEAVES_A_GRANDCHILD = """
import signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
time.sleep(0.5)  # let the grandchild set its handler
open(sys.argv[1], "w").write(str(grandchild.pid))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits, leaving the grandchild behind
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_stopping_the_stack_leaves_nothing_of_a_child_behind(tmp_path: Path) -> None:
    """Stages start in order, their `then` runs, and a stop sweeps each child's process group
    (here a grandchild that ignores SIGTERM)."""
    pid_file, order = tmp_path / "grandchild.pid", []
    script = tmp_path / "leaves_a_grandchild.py"
    script.write_text(LEAVES_A_GRANDCHILD)
    parent = supervisor.ChildService(
        name="parent",
        argv=[sys.executable, str(script), str(pid_file)],
        url="",
        ready=lambda: pid_file.is_file() and pid_file.read_text() != "",
    )
    health = health_service(tmp_path, lifetime_s=60)
    stages = [
        supervisor.Stage([parent], then=lambda: order.append("parent ready")),
        supervisor.Stage([health], then=lambda: order.append("health ready")),
    ]

    def on_ready() -> None:
        order.append("on_ready")
        os.kill(os.getpid(), signal.SIGTERM)

    assert supervisor.run_stack(stages, startup_timeout_s=30, on_ready=on_ready) == 0
    assert order == ["parent ready", "health ready", "on_ready"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10  # reaped by init once killed
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert parent.process is not None and parent.process.returncode == 0  # its own clean exit


def test_the_command_line_and_the_stack_import_no_service_framework() -> None:
    """`draftopd up` starts the services as processes: the library imports none of their
    frameworks (docs/design.md §1), and `--help` stays fast (no torch)."""
    code = (
        "import sys, draftopd.cli, draftopd.stack.up, draftopd.stack.supervisor; "
        "print(sorted({'fastapi', 'celery', 'sqlalchemy', 'alembic', 'torch'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
