"""``draftopd.wire.registry_client`` against a live registry (uvicorn on a free port, real HTTP)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from draftopd.wire.registry_client import RegistryClient, RegistryError, pack_checkpoint
from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import DRAFTER, TOKEN, live_server, write_checkpoint

SFT_SPEC = {"mode": "sft", "out_dir": "/tmp/draftopd-run", "sft": {"total_steps": 30}}


@pytest.fixture
def base_url(make_settings: Callable[..., RegistrySettings]) -> Iterator[str]:
    with live_server(create_app(make_settings())) as url:
        yield url


@pytest.fixture
def registry(base_url: str) -> Iterator[RegistryClient]:
    with RegistryClient(base_url, token=TOKEN) as client:
        client.create_drafter(DRAFTER, target_model="smollm2")
        yield client


def test_upload_and_download_round_trip(registry: RegistryClient, tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "ckpt", seed=1)
    (source / "README.md").write_text("trained for 30 steps\n")
    version = registry.upload_version(DRAFTER, source, step=30)
    assert version["version"] == 1 and version["step"] == 30
    packed = pack_checkpoint(source, tmp_path / "again.tar")
    assert version["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()  # reproducible

    dest = registry.download_version(DRAFTER, 1, tmp_path / "downloads" / "v1")
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    for name in names:
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["v1"]


def test_download_by_alias_and_overwrite(registry: RegistryClient, tmp_path: Path) -> None:
    for seed in (1, 2):
        registry.upload_version(DRAFTER, write_checkpoint(tmp_path / f"ckpt{seed}", seed=seed))
    alias = registry.put_alias(DRAFTER, "production", 2)
    dest = tmp_path / "serving"
    registry.download_version(DRAFTER, "production", dest, expected_sha256=alias["sha256"])
    wanted = (tmp_path / "ckpt2" / "model.safetensors").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == wanted
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        registry.download_version(DRAFTER, 1, dest)
    registry.download_version(DRAFTER, 1, dest, overwrite=True)
    wanted = (tmp_path / "ckpt1" / "model.safetensors").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == wanted


def test_tampered_artifact_is_refused_and_deleted(registry: RegistryClient, tmp_path: Path) -> None:
    version = registry.upload_version(DRAFTER, write_checkpoint(tmp_path / "ckpt"))
    (stored,) = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    data = bytearray(stored.read_bytes())
    data[600] ^= 0xFF  # one byte flipped; the archive is still a readable tar
    stored.write_bytes(bytes(data))
    tampered = hashlib.sha256(bytes(data)).hexdigest()

    downloads = tmp_path / "downloads"
    with pytest.raises(ValueError, match=f"its sha256 is {tampered} but registry record says"):
        registry.download_version(DRAFTER, 1, downloads / "v1")
    assert list(downloads.iterdir()) == []  # no checkpoint, no partial download
    assert version["sha256"] != tampered


def test_expected_sha_mismatch_is_refused(registry: RegistryClient, tmp_path: Path) -> None:
    registry.upload_version(DRAFTER, write_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="expected_sha256 says 0000"):
        registry.download_version(DRAFTER, 1, tmp_path / "out", expected_sha256="0000")
    assert not (tmp_path / "out").exists()


def test_pack_refuses_non_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"missing model\.safetensors, config\.json"):
        pack_checkpoint(tmp_path / "empty", tmp_path / "out.tar")
    source = write_checkpoint(tmp_path / "ckpt")
    (source / "optimizer.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"optimizer\.pt: symlinks and pickle files"):
        pack_checkpoint(source, tmp_path / "out.tar")


def test_compressed_upload(registry: RegistryClient, tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "ckpt", seed=5)
    version = registry.upload_version(DRAFTER, source, compress=True)
    packed = pack_checkpoint(source, tmp_path / "c.tar.gz", compress=True)
    assert version["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    dest = registry.download_version(DRAFTER, 1, tmp_path / "out")
    wanted = (source / "model.safetensors").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == wanted


def test_errors_carry_status_and_message(registry: RegistryClient, base_url: str) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get_drafter("missing")
    assert info.value.status_code == 404
    assert info.value.detail == "drafter 'missing' not found"
    with pytest.raises(RegistryError) as info:
        registry.create_drafter(DRAFTER, target_model="smollm2")
    assert info.value.status_code == 409
    with RegistryClient(base_url) as anonymous, pytest.raises(RegistryError) as info:
        anonymous.create_drafter("x", target_model="t")
    assert info.value.status_code == 401
    assert [d["name"] for d in registry.list_drafters()] == [DRAFTER]


def test_metrics_aliases_and_jobs_through_the_client(
    registry: RegistryClient, tmp_path: Path
) -> None:
    registry.upload_version(DRAFTER, write_checkpoint(tmp_path / "ckpt"))
    metric = registry.post_metrics(DRAFTER, 1, benchmark="mt-bench", tau=1.4, speedup=1.2)
    assert (metric["tau"], metric["speedup"]) == (1.4, 1.2)
    assert [m["benchmark"] for m in registry.list_metrics(DRAFTER, 1)] == ["mt-bench"]
    registry.put_alias(DRAFTER, "candidate", 1)
    assert registry.get_alias(DRAFTER, "candidate")["version"] == 1
    assert [a["alias"] for a in registry.list_aliases(DRAFTER)] == ["candidate"]
    assert registry.get_version(DRAFTER, 1)["version"] == 1
    assert len(registry.list_versions(DRAFTER)) == 1

    job = registry.create_train_job(DRAFTER, SFT_SPEC, base_version=1)
    assert (job["status"], job["total_steps"], job["base_version"]) == ("queued", 30, 1)
    running = registry.update_train_job(job["id"], status="running", step=3, progress=0.1, tau=1.2)
    assert (running["status"], running["step"], running["tau"]) == ("running", 3, 1.2)
    assert registry.cancel_train_job(job["id"])["cancel_requested"] is True
    assert registry.get_train_job(job["id"])["status"] == "running"
    assert [j["id"] for j in registry.list_train_jobs(status="running")] == [job["id"]]
    assert registry.list_train_jobs(status="queued") == []
    assert registry.health()["schema_revision"] == "0003"


def test_concurrent_uploads_get_distinct_numbers(
    registry: RegistryClient, base_url: str, tmp_path: Path
) -> None:
    sources = [write_checkpoint(tmp_path / f"ckpt{i}", seed=i) for i in range(6)]

    def upload_one(source: Path) -> dict[str, Any]:
        with RegistryClient(base_url, token=TOKEN) as own:
            return own.upload_version(DRAFTER, source)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(upload_one, sources))
    assert sorted(r["version"] for r in results) == [1, 2, 3, 4, 5, 6]
    listed = {v["version"]: v["sha256"] for v in registry.list_versions(DRAFTER)}
    assert listed == {r["version"]: r["sha256"] for r in results}
    assert len(set(listed.values())) == 6
