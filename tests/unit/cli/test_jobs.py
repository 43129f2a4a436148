"""``draftopd jobs list|watch|cancel`` against a live registry (SQLite, real HTTP, real Redis):
watch follows a job a background thread reports on, exits 0/1/2/130 as documented, list shows
and filters the rows, cancel sets ``cancel_requested``; the module stays torch-free."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from draftopd.cli import jobs as cli_jobs
from draftopd.cli import main
from draftopd.wire.registry_client import RegistryClient
from tests.servers import ctrl_c_default
from tests.services.registry.helpers import TOKEN, live_registry, write_checkpoint

DRAFTER = "tiny-eagle3"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Overrides the torch-importing autouse fixture of tests/conftest.py: no torch here."""
    yield


@pytest.fixture(autouse=True)
def _no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pass --registry-url and --token themselves unless they test the defaults."""
    monkeypatch.delenv(cli_jobs.URL_ENV, raising=False)
    monkeypatch.delenv(cli_jobs.TOKEN_ENV, raising=False)


@pytest.fixture
def registry(redis_url: str, tmp_path: Path) -> Iterator[RegistryClient]:
    with live_registry(redis_url, tmp_path, DRAFTER) as client:
        yield client


def _url(client: RegistryClient) -> str:
    return str(client.http.base_url).rstrip("/")


def _new_job(client: RegistryClient, drafter: str = DRAFTER, steps: int = 5) -> str:
    spec = {"mode": "sft", "out_dir": "/tmp/draftopd-cli-jobs", "sft": {"total_steps": steps}}
    job_id: str = client.create_train_job(drafter, spec)["id"]
    return job_id


def _exit_code(argv: list[str]) -> int:
    """main's exit status, whether it returns or exits through parser.exit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- watch ----------------------------------------------------------------------------------------


def test_watch_follows_a_job_to_success(
    registry: RegistryClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    checkpoint = write_checkpoint(tmp_path / "ckpt")

    def trainer() -> None:
        for k in range(1, 6):
            time.sleep(0.1)
            registry.update_train_job(
                job_id, status="running", step=k, total_steps=5, progress=k / 5, tau=1 + k / 4
            )
            if k in (2, 4):
                registry.upload_version(DRAFTER, checkpoint, job_id=job_id, step=k)
        registry.update_train_job(job_id, status="succeeded")

    with ThreadPoolExecutor(max_workers=1) as pool:
        reporting = pool.submit(trainer)
        code = _exit_code(["jobs", "watch", job_id, "--registry-url", _url(registry),
                           "--interval", "0.05"])  # fmt: skip
        reporting.result(timeout=30)  # re-raises the trainer thread's error, if any
    out, err = capsys.readouterr()
    assert code == 0
    assert out.splitlines() == [
        f"job {job_id} succeeded",
        "step: 5/5",
        "tau: 2.250",
        "versions: 1, 2",
    ]
    bar_final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "5/5" in bar_final and "status=succeeded" in bar_final and "tau=2.250" in bar_final


def test_watch_a_failed_job_exits_1_with_its_error(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    registry.update_train_job(job_id, status="running", step=3, total_steps=5, progress=0.6)
    registry.update_train_job(job_id, status="failed", error="CUDA out of memory at step 3")
    code = _exit_code(["jobs", "watch", job_id, "--registry-url", _url(registry)])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"job {job_id} failed" in out and "step: 3/5" in out
    assert f"job {job_id} failed: CUDA out of memory at step 3" in err


def test_watch_a_cancelled_job_exits_1(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    registry.cancel_train_job(job_id)  # a queued job is cancelled at once
    code = _exit_code(["jobs", "watch", job_id, "--registry-url", _url(registry)])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"job {job_id} cancelled" in out and f"job {job_id} was cancelled" in err


def test_watch_an_unknown_job_exits_2_naming_it(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(registry)
    code = _exit_code(["jobs", "watch", "no-such-job", "--registry-url", url])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert f"no train job 'no-such-job' at {url}" in err


def test_an_unreachable_registry_exits_2_naming_the_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code = _exit_code(["jobs", "watch", "some-job", "--registry-url", url])
    _, err = capsys.readouterr()
    assert code == 2
    assert f"cannot reach the registry at {url}" in err
    assert "Traceback" not in err


def test_ctrl_c_exits_130_without_a_traceback(registry: RegistryClient) -> None:
    job_id = _new_job(registry)
    argv = [sys.executable, "-m", "draftopd.cli", "jobs", "watch", job_id,
            "--registry-url", _url(registry), "--interval", "0.05"]  # fmt: skip
    process = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_default,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the "watching ..." log line: polling has begun
        assert f"watching train job {job_id}" in first
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopped watching job {job_id}" in err
    assert out == ""


# -- list -----------------------------------------------------------------------------------------


def _row(out: str, job_id: str) -> list[str]:
    rows = [line.split() for line in out.splitlines() if line.startswith(job_id)]
    assert len(rows) == 1, out
    return rows[0]


def test_list_shows_and_filters_the_jobs(
    registry: RegistryClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.create_drafter("other-eagle3", target_model="tiny")
    queued = _new_job(registry)
    running = _new_job(registry)
    other = _new_job(registry, drafter="other-eagle3", steps=7)
    registry.update_train_job(running, status="running", step=2, progress=0.4, tau=1.5)
    monkeypatch.setenv(cli_jobs.URL_ENV, _url(registry))  # the default for --registry-url

    assert _exit_code(["jobs", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "id", "mode", "drafter", "status", "step/total", "progress", "tau", "updated",
    ]  # fmt: skip
    running_row = _row(out, running)
    assert running_row[:7] == [running, "sft", DRAFTER, "running", "2/5", "40%", "1.500"]
    assert _row(out, queued)[:7] == [queued, "sft", DRAFTER, "queued", "-/5", "0%", "-"]
    assert _row(out, other)[2] == "other-eagle3"
    updated = registry.get_train_job(running)["updated_at"]
    assert " ".join(running_row[7:]) == updated[:19].replace("T", " ")

    assert _exit_code(["jobs", "list", "--status", "running"]) == 0
    out = capsys.readouterr().out
    assert running in out and queued not in out and other not in out

    assert _exit_code(["jobs", "list", "--drafter", "other-eagle3", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert other in out and running not in out and queued not in out

    assert _exit_code(["jobs", "list", "--status", "failed"]) == 0
    assert capsys.readouterr().out == "no train jobs\n"


def test_list_limit_keeps_the_newest(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [_new_job(registry) for _ in range(3)]
    assert _exit_code(["jobs", "list", "--limit", "1", "--registry-url", _url(registry)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2  # the header and one row
    assert jobs[-1] in out


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_sets_cancel_requested(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    registry.update_train_job(job_id, status="running", step=1, progress=0.2)
    argv = ["jobs", "cancel", job_id, "--registry-url", _url(registry), "--token", TOKEN]
    assert _exit_code(argv) == 0
    assert capsys.readouterr().out == f"job {job_id}: running, cancel requested\n"
    job = registry.get_train_job(job_id)
    assert (job["status"], job["cancel_requested"]) == ("running", True)


def test_cancel_without_the_token_exits_2_and_changes_nothing(
    registry: RegistryClient, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    code = _exit_code(["jobs", "cancel", job_id, "--registry-url", _url(registry)])
    err = capsys.readouterr().err
    assert code == 2
    assert "refused the request (401" in err and "--token" in err
    job = registry.get_train_job(job_id)
    assert (job["status"], job["cancel_requested"]) == ("queued", False)


def test_cancel_reads_the_token_from_the_environment(
    registry: RegistryClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _new_job(registry)
    monkeypatch.setenv(cli_jobs.TOKEN_ENV, TOKEN)
    assert _exit_code(["jobs", "cancel", job_id, "--registry-url", _url(registry)]) == 0
    assert capsys.readouterr().out == f"job {job_id}: cancelled\n"
    job: dict[str, Any] = registry.get_train_job(job_id)
    assert (job["status"], job["cancel_requested"]) == ("cancelled", True)


# -- imports --------------------------------------------------------------------------------------


def test_the_module_is_torch_free() -> None:
    code = (
        "import sys, draftopd.cli.jobs\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'sqlalchemy', 'transformers')"
        " if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
