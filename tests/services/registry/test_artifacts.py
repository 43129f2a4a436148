"""Artifact upload and download: sha256, streaming to the store, and refusing bad archives."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.registry.main import create_app
from services.registry.settings import RegistrySettings
from tests.services.registry.helpers import (
    AUTH,
    DRAFTER,
    checkpoint_files,
    checkpoint_tar,
    create_drafter,
    tar_bytes,
    upload,
)


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_upload_download_round_trip(client: TestClient, tmp_path: Path, mode: str) -> None:
    create_drafter(client)
    data = checkpoint_tar(seed=3, mode=mode)
    version = upload(client, DRAFTER, data).json()
    assert version["sha256"] == hashlib.sha256(data).hexdigest()
    assert version["size_bytes"] == len(data)

    response = client.get(f"/drafters/{DRAFTER}/versions/1/artifact")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["X-Content-SHA256"] == version["sha256"]
    assert response.headers["content-length"] == str(len(data))
    gz = mode == "w:gz"
    assert response.headers["content-type"] == ("application/gzip" if gz else "application/x-tar")
    assert (
        f'filename="{DRAFTER}-v1.tar{".gz" if gz else ""}"'
        in response.headers["content-disposition"]
    )
    # the store holds exactly the uploaded bytes, under the drafter's name, and no temp files
    files = stored_files(tmp_path / "artifacts")
    assert len(files) == 1 and files[0].parent.name == DRAFTER
    assert files[0].read_bytes() == data


def test_same_bytes_twice_make_two_versions_with_one_sha(client: TestClient) -> None:
    create_drafter(client)
    first = upload(client, DRAFTER, checkpoint_tar()).json()
    second = upload(client, DRAFTER, checkpoint_tar()).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert first["sha256"] == second["sha256"]


PICKLED = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)


def _torch_style_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", PICKLED)
    return buffer.getvalue()


def _without_end_marker(data: bytes) -> bytes:
    """The archive cut right after its last member's data: every file is complete, but the
    two zero blocks that end a tar are gone (an upload cut short at a block boundary)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        end = tar.offset
    return data[:end]


BAD_ARCHIVES: dict[str, tuple[bytes, str]] = {
    "raw pickle": (PICKLED, "the uploaded file is pickle data"),
    "torch zip": (_torch_style_zip(), "the uploaded file is a zip archive"),
    "pickle member by name": (
        tar_bytes({**checkpoint_files(), "optimizer.pt": b"anything"}),
        "'optimizer.pt' looks like a pickle file",
    ),
    "pickle member by content": (
        tar_bytes({**checkpoint_files(), "extra.dat": PICKLED}),
        "archive member 'extra.dat' is not allowed",
    ),
    "pickle protocol 0": (
        tar_bytes({**checkpoint_files(), "state": pickle.dumps({"a": 1}, protocol=0)}),
        "archive member 'state' is not allowed",
    ),
    "pickle protocol 1 as weights": (
        tar_bytes({**checkpoint_files(), "extra.safetensors": pickle.dumps([1], protocol=1)}),
        "extra.safetensors has no valid safetensors header",
    ),
    "binary README": (
        tar_bytes({**checkpoint_files(), "README.md": b"\xff\xfe\x00"}),
        "README.md is not UTF-8 text",
    ),
    "truncated archive": (
        _without_end_marker(tar_bytes(checkpoint_files())),
        "no end-of-archive marker",
    ),
    "pickle disguised as weights": (
        tar_bytes({**checkpoint_files(), "model.safetensors": PICKLED}),
        "model.safetensors has no valid safetensors header",
    ),
    "not a tar": (b"hello, this is not an archive" * 100, "not a readable tar archive"),
    "missing weights": (
        tar_bytes({"config.json": b"{}"}),
        "the archive lacks model.safetensors at its root",
    ),
    "weights in a subdirectory": (
        tar_bytes({f"ckpt/{k}": v for k, v in checkpoint_files().items()}),
        "is not allowed: an artifact holds config.json",
    ),
    "config not json": (
        tar_bytes({**checkpoint_files(), "config.json": b"{nope"}),
        "config.json is not valid JSON",
    ),
    "config with NaN": (
        tar_bytes({**checkpoint_files(), "config.json": b'{"tau": NaN}'}),
        "config.json contains NaN, which JSON does not allow",
    ),
    "config not an object": (
        tar_bytes({**checkpoint_files(), "config.json": b"[1, 2]"}),
        "config.json must hold a JSON object",
    ),
    "weights not safetensors": (
        tar_bytes({**checkpoint_files(), "model.safetensors": b"\x00" * 64}),
        "model.safetensors has no valid safetensors header",
    ),
    "path traversal": (
        tar_bytes({**checkpoint_files(), "../escape.txt": b"x"}),
        "escapes the checkpoint dir",
    ),
    "wrong architecture": (
        tar_bytes(checkpoint_files(architecture="dflash")),
        "config.json declares architecture 'dflash' but drafter",
    ),
    "empty": (b"", "the uploaded file is empty"),
}


def _safetensors_with_header_length(length: int) -> bytes:
    """A valid safetensors file whose 8-byte header length is exactly ``length``."""
    body = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    header = (body + " " * (length - len(body))).encode()
    return length.to_bytes(8, "little") + header + b"\x00" * 4


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])  # 0x80 0x02..0x05: pickle's PROTO
def test_weights_whose_header_length_looks_like_a_pickle_opcode_are_accepted(
    client: TestClient, length: int
) -> None:
    create_drafter(client)
    weights = _safetensors_with_header_length(length)
    assert weights[:2] == bytes([0x80, length // 256])
    response = upload(
        client, DRAFTER, tar_bytes({**checkpoint_files(), "model.safetensors": weights})
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archives_are_400_and_leave_nothing(
    client: TestClient, tmp_path: Path, case: str
) -> None:
    create_drafter(client)
    data, message = BAD_ARCHIVES[case]
    response = upload(client, DRAFTER, data)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert client.get(f"/drafters/{DRAFTER}/versions").json() == []
    assert stored_files(tmp_path / "artifacts") == []


def test_symlink_member_is_refused(client: TestClient) -> None:
    create_drafter(client)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in checkpoint_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    response = upload(client, DRAFTER, buffer.getvalue())
    assert response.status_code == 400
    assert "'passwd' is not a regular file or directory" in response.json()["detail"]


@pytest.mark.parametrize("filename", ["model.bin", "drafter.pt", "state.PKL"])
def test_pickle_filenames_are_refused(client: TestClient, filename: str) -> None:
    create_drafter(client)
    response = client.post(
        f"/drafters/{DRAFTER}/versions",
        files={"artifact": (filename, checkpoint_tar(), "application/octet-stream")},
        headers=AUTH,
    )
    assert response.status_code == 400
    assert f"{filename!r} looks like a pickle file" in response.json()["detail"]


def test_oversized_upload_is_413_and_leaves_nothing(
    make_settings: Callable[..., RegistrySettings], tmp_path: Path
) -> None:
    data = checkpoint_tar()
    with TestClient(create_app(make_settings(max_artifact_bytes=len(data) - 1))) as client:
        create_drafter(client)
        response = upload(client, DRAFTER, data)
        assert response.status_code == 413
        assert response.json()["detail"] == f"the artifact is larger than {len(data) - 1} bytes"
        assert stored_files(tmp_path / "artifacts") == []


def test_upload_form_validation(client: TestClient) -> None:
    create_drafter(client)
    response = upload(client, DRAFTER, checkpoint_tar(), step="many")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "step"]
    response = client.post(f"/drafters/{DRAFTER}/versions", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "artifact"]
    assert upload(client, "nobody", checkpoint_tar()).status_code == 404


def test_missing_artifact_file_is_404_not_500(client: TestClient, tmp_path: Path) -> None:
    create_drafter(client)
    upload(client, DRAFTER, checkpoint_tar())
    (stored,) = stored_files(tmp_path / "artifacts")
    stored.unlink()
    response = client.get(f"/drafters/{DRAFTER}/versions/1/artifact")
    assert response.status_code == 404
    assert response.json()["detail"] == (
        f"the artifact of drafter {DRAFTER!r} version 1 is missing from the store"
    )


def test_allowed_extras_are_kept(client: TestClient) -> None:
    create_drafter(client)
    files = {**checkpoint_files(), "README.md": "a drafter ✓".encode(), "LICENSE": b"MIT"}
    files["extra.safetensors"] = checkpoint_files()["model.safetensors"]
    assert upload(client, DRAFTER, tar_bytes(files)).status_code == 201


def test_a_gzip_bomb_is_refused_by_its_unpacked_size(make_settings: Any, tmp_path: Path) -> None:
    """200 KB of gzip that unpacks to 200 MB, against a 50 MB unpacked cap: 413, nothing kept."""
    files = {**checkpoint_files(), "README.md": b" " * (200 << 20)}
    bomb = tar_bytes(files, mode="w:gz")
    assert len(bomb) < 1 << 20
    settings = make_settings(max_unpacked_artifact_bytes=50 << 20)
    with TestClient(create_app(settings)) as small:
        create_drafter(small)
        response = upload(small, DRAFTER, bomb)
        assert response.status_code == 413, response.text
        assert "unpacks to more than" in response.json()["detail"]
        assert small.get(f"/drafters/{DRAFTER}/versions").json() == []
    assert stored_files(tmp_path / "artifacts") == []


def test_a_gzip_bomb_of_weights_is_refused_by_its_compression_ratio(
    client: TestClient, tmp_path: Path
) -> None:
    """With the default settings: a 200 MB "weights" file of zeros (a valid safetensors header)
    gzips to a few hundred KB; it unpacks to far more than 20 times its size: 413."""
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [200 << 20], "data_offsets": [0, 200 << 20]}}
    )
    weights = len(header).to_bytes(8, "little") + header.encode() + bytes(200 << 20)
    bomb = tar_bytes({**checkpoint_files(), "model.safetensors": weights}, mode="w:gz")
    assert len(bomb) < 1 << 20
    create_drafter(client)
    response = upload(client, DRAFTER, bomb)
    assert response.status_code == 413, response.text
    assert client.get(f"/drafters/{DRAFTER}/versions").json() == []
    assert stored_files(tmp_path / "artifacts") == []
