"""draftopd.cli: argument parsing, `bench --json`, clear errors, and the `up` supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from draftopd import cli
from draftopd.bench import REPORT_KEYS
from draftopd.models.tiny import build_tiny_target

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    assert "applies only to method 'eagle3'" in capsys.readouterr().err


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
    assert f"cannot listen on 127.0.0.1:{busy_port}" in capsys.readouterr().err


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


def health_service(tmp_path: Path, *, lifetime_s: float) -> cli.ChildService:
    script = tmp_path / "health_server.py"
    script.write_text(HEALTH_SERVER)
    port = free_port()
    return cli.ChildService(
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

    assert cli.run_stack([service], startup_timeout_s=30, on_ready=on_ready) == 0
    assert ready == [True]
    assert service.process is not None
    assert service.process.returncode == -signal.SIGTERM  # stopped by us, not by its lifetime
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handler restored


def test_run_stack_reports_a_child_that_dies(tmp_path: Path) -> None:
    service = health_service(tmp_path, lifetime_s=1.5)
    assert cli.run_stack([service], startup_timeout_s=30) == 1
    assert service.process is not None
    assert service.process.returncode == 0


def test_run_stack_child_failing_at_startup(tmp_path: Path) -> None:
    service = cli.ChildService(
        name="broken", argv=[sys.executable, "-c", "raise SystemExit(3)"], url="http://127.0.0.1:9"
    )
    with pytest.raises(cli.CommandError, match="broken exited with code 3"):
        cli.run_stack([service], startup_timeout_s=30)
