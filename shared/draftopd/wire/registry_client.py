"""HTTP client for the draftopd registry (docs/design.md §4). Torch-free: httpx and the standard
library.

Artifacts travel as a tar of the checkpoint directory's contents (``model.safetensors``,
``config.json`` and any other files at the archive root). ``upload_version`` packs the directory
into a temporary tar (reproducible: fixed mtimes and owners, so the same checkpoint gives the same
sha256) and streams it up. ``download_version`` streams the artifact to a temporary file while
hashing it, refuses it unless the sha256 matches the registry's record (and the
``X-Content-SHA256`` header, and the caller's expectation if given), then unpacks it safely and
moves it into place; a refused download leaves nothing behind.

Every method returns the registry's JSON (dicts and lists). An error response raises
``RegistryError`` with the status code and the server's message.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Protocol, overload

import httpx

from draftopd.wire.formats import REQUIRED_FILES, is_pickle_name, parse_registry_ref

SHA256_HEADER = "X-Content-SHA256"
CHUNK_BYTES = 1 << 20
TransportError = httpx.TransportError  # the registry could not be reached (for callers)


class RegistryError(RuntimeError):
    """The registry answered with an error status."""

    def __init__(self, status_code: int, detail: Any, *, method: str, url: str) -> None:
        message = detail if isinstance(detail, str) else json.dumps(detail)
        super().__init__(f"{method} {url} -> {status_code}: {message}")
        self.status_code = status_code
        self.detail = detail


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def pack_checkpoint(checkpoint_dir: str | Path, out: str | Path, *, compress: bool = False) -> Path:
    """Write the checkpoint directory's contents as a tar (gzip if ``compress``) to ``out``."""
    source, out = Path(checkpoint_dir), Path(out)
    missing = [name for name in REQUIRED_FILES if not (source / name).is_file()]
    if missing:
        raise ValueError(f"{source} is not a drafter checkpoint: missing {', '.join(missing)}")
    files = sorted(p for p in source.rglob("*") if p.is_file() or p.is_symlink())
    for path in files:
        if path.is_symlink() or is_pickle_name(path.name):
            raise ValueError(
                f"refusing to upload {path}: symlinks and pickle files are not allowed"
            )
    with out.open("wb") as raw:
        stream = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if compress else raw
        with stream, tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in files:
                tar.add(path, arcname=path.relative_to(source).as_posix(), filter=_normalise)
    return out


def unpack_checkpoint(archive: str | Path, dest: str | Path) -> Path:
    """Extract a checkpoint archive into ``dest`` (regular files and directories only)."""
    dest = Path(dest)
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar.getmembers():
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"archive member {member.name!r} is not a file or directory")
            if is_pickle_name(member.name):
                raise ValueError(f"archive member {member.name!r} looks like a pickle file")
        tar.extractall(dest, filter="data")
    return dest


class RegistryClient:
    """A connection to one registry. Use as a context manager or call ``close()``."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RegistryError(
            response.status_code,
            detail,
            method=response.request.method,
            url=str(response.request.url),
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        self._check(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/health")
        return result

    # -- drafters and versions -------------------------------------------------------------------

    def list_drafters(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/drafters")
        return result

    def get_drafter(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/drafters/{name}")
        return result

    def create_drafter(
        self, name: str, *, target_model: str, architecture: str = "eagle3", description: str = ""
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "target_model": target_model,
            "architecture": architecture,
            "description": description,
        }
        result: dict[str, Any] = self._json("POST", "/drafters", json=body)
        return result

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/drafters/{name}/versions")
        return result

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/drafters/{name}/versions/{version}")
        return result

    def upload_version(
        self,
        name: str,
        checkpoint_dir: str | Path,
        *,
        parent_version: int | None = None,
        job_id: str | None = None,
        step: int | None = None,
        compress: bool = False,
    ) -> dict[str, Any]:
        """Pack and upload a checkpoint directory as the drafter's next version."""
        form = {"parent_version": parent_version, "job_id": job_id, "step": step}
        data = {key: str(value) for key, value in form.items() if value is not None}
        filename = "checkpoint.tar.gz" if compress else "checkpoint.tar"
        with tempfile.TemporaryDirectory(prefix="draftopd-upload-") as tmp:
            archive = pack_checkpoint(checkpoint_dir, Path(tmp) / filename, compress=compress)
            with archive.open("rb") as stream:
                files = {"artifact": (filename, stream, "application/x-tar")}
                result: dict[str, Any] = self._json(
                    "POST", f"/drafters/{name}/versions", data=data, files=files
                )
        return result

    def download_version(
        self,
        name: str,
        version: int | str,
        dest: str | Path,
        *,
        expected_sha256: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Download a version (a number, or an alias name) into the directory ``dest``.

        Raises ``ValueError`` (and keeps nothing) if the bytes do not hash to the registry's
        sha256; ``dest`` must not exist unless ``overwrite``."""
        number = self.get_alias(name, version)["version"] if isinstance(version, str) else version
        record = self.get_version(name, number)
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise ValueError(f"{dest} exists; pass overwrite=True to replace it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
            archive = Path(tmp) / "artifact"
            header, actual = self._fetch(f"/drafters/{name}/versions/{number}/artifact", archive)
            claims = {"registry record": record["sha256"], SHA256_HEADER: header}
            if expected_sha256 is not None:
                claims["expected_sha256"] = expected_sha256
            wrong = [f"{what} says {sha}" for what, sha in claims.items() if sha != actual]
            if wrong:
                archive.unlink()
                raise ValueError(
                    f"refusing {name} v{number}: its sha256 is {actual} but {'; '.join(wrong)}"
                )
            unpacked = unpack_checkpoint(archive, Path(tmp) / "checkpoint")
            if dest.exists():
                shutil.rmtree(dest)
            unpacked.rename(dest)
        return dest

    def fetch_version(
        self, name: str, version: int, cache_dir: str | Path, *, expected_sha256: str | None = None
    ) -> Path:
        """The version's checkpoint directory under ``cache_dir``, downloaded (and verified by
        ``download_version``) unless the cache holds it: ``cache_dir/NAME/v{VERSION}-{sha[:16]}``.

        A cached directory was verified when it was downloaded and is not hashed again."""
        sha256 = expected_sha256 or self.get_version(name, version)["sha256"]
        dest = Path(cache_dir) / name / f"v{version}-{sha256[:16]}"
        if dest.is_dir():
            return dest
        try:
            return self.download_version(name, version, dest, expected_sha256=sha256)
        except (OSError, ValueError):
            if dest.is_dir():  # another process put the same version into the cache first
                return dest
            raise

    def _fetch(self, path: str, out: Path) -> tuple[str | None, str]:
        """Stream ``path`` into ``out``; returns (the sha256 header, the body's sha256)."""
        digest = hashlib.sha256()
        with self.http.stream("GET", path) as response:
            self._check(response)
            with out.open("wb") as sink:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    sink.write(chunk)
                    digest.update(chunk)
            return response.headers.get(SHA256_HEADER), digest.hexdigest()

    # -- metrics and aliases ---------------------------------------------------------------------

    def post_metrics(
        self,
        name: str,
        version: int,
        *,
        benchmark: str,
        tau: float,
        temperature: float = 0.0,
        speedup: float | None = None,
        tokens_per_s: float | None = None,
        hardware: str = "",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {
            "benchmark": benchmark,
            "tau": tau,
            "temperature": temperature,
            "speedup": speedup,
            "tokens_per_s": tokens_per_s,
            "hardware": hardware,
            "extra": extra or {},
        }
        result: dict[str, Any] = self._json(
            "POST", f"/drafters/{name}/versions/{version}/metrics", json=body
        )
        return result

    def list_metrics(self, name: str, version: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(
            "GET", f"/drafters/{name}/versions/{version}/metrics"
        )
        return result

    def put_alias(
        self, name: str, alias: str, version: int, *, traffic: float | None = None
    ) -> dict[str, Any]:
        """Point ``alias`` at ``version``; ``traffic`` gives it a share of requests (the canary
        on ``candidate``)."""
        body: dict[str, Any] = {"version": version}
        if traffic is not None:
            body["traffic"] = traffic
        result: dict[str, Any] = self._json("PUT", f"/drafters/{name}/aliases/{alias}", json=body)
        return result

    def report_live(self, name: str, version: int, report: dict[str, Any]) -> bool:
        """Send one live report (counters since the previous one); False: a repeat."""
        result = self._json(
            "POST", f"/drafters/{name}/versions/{version}/live-metrics", json=report
        )
        return bool(result["stored"])

    def get_live(self, name: str, version: int, *, since: str | None = None) -> dict[str, Any]:
        """A version's live tau and tokens/s (since ``since``, an ISO time, if given)."""
        params = {} if since is None else {"since": since}
        result: dict[str, Any] = self._json(
            "GET", f"/drafters/{name}/versions/{version}/live-metrics", params=params
        )
        return result

    def list_live(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/drafters/{name}/live-metrics")
        return result

    def get_alias(self, name: str, alias: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/drafters/{name}/aliases/{alias}")
        return result

    def list_events(
        self, name: str, *, alias: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The drafter's alias moves, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if alias is not None:
            params["alias"] = alias
        result: list[dict[str, Any]] = self._json("GET", f"/drafters/{name}/events", params=params)
        return result

    def list_aliases(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/drafters/{name}/aliases")
        return result

    # -- train jobs ------------------------------------------------------------------------------

    def create_train_job(
        self,
        drafter: str,
        spec: dict[str, Any],
        *,
        base_version: int | None = None,
        promote_to: str | None = None,
        continual: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit a job; ``continual`` ({"min_new_prompts": N, "traffic": s}) makes it a
        continual Draft-OPD job on captured traffic."""
        body: dict[str, Any] = {
            "drafter": drafter,
            "spec": spec,
            "base_version": base_version,
            "promote_to": promote_to,
        }
        if continual is not None:
            body["continual"] = continual
        result: dict[str, Any] = self._json("POST", "/train-jobs", json=body)
        return result

    def get_train_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/train-jobs/{job_id}")
        return result

    def list_train_jobs(
        self, *, status: str | None = None, drafter: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        query = {"status": status, "drafter": drafter, "limit": limit}
        params = {key: value for key, value in query.items() if value is not None}
        result: list[dict[str, Any]] = self._json("GET", "/train-jobs", params=params)
        return result

    def update_train_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Report status/progress/step/total_steps/tau/error (the trainer's side)."""
        result: dict[str, Any] = self._json("PATCH", f"/train-jobs/{job_id}", json=fields)
        return result

    def cancel_train_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", f"/train-jobs/{job_id}/cancel")
        return result


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


@overload
def connect(
    url: str, token: _Secret | str | None = ..., *, timeout: float = ...
) -> RegistryClient: ...
@overload
def connect(url: None, token: _Secret | str | None = ..., *, timeout: float = ...) -> None: ...
@overload
def connect(
    url: str | None, token: _Secret | str | None = ..., *, timeout: float = ...
) -> RegistryClient | None: ...


def connect(
    url: str | None, token: _Secret | str | None = None, *, timeout: float = 60.0
) -> RegistryClient | None:
    """A client for the registry at ``url`` (None without a url): how the services build theirs
    from their settings (``token`` may be a pydantic ``SecretStr``)."""
    if url is None:
        return None
    secret = token if token is None or isinstance(token, str) else token.get_secret_value()
    return RegistryClient(url, token=secret, timeout=timeout)


def resolve_drafter_ref(ref: str, client: RegistryClient | None, cache_dir: str | Path) -> Path:
    """The local checkpoint directory of a drafter reference: ``ref`` itself for a path, or the
    registry version ``registry://NAME/VERSION`` fetched (sha256-verified, once) into
    ``cache_dir``. The trainer and the rollout workers both resolve references here."""
    parsed = parse_registry_ref(ref)
    if parsed is None:
        return Path(ref)
    if client is None:
        raise ValueError(f"drafter {ref} needs a registry, and none is configured")
    return client.fetch_version(parsed.name, parsed.version, cache_dir)
