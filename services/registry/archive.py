"""Checks on an uploaded drafter artifact: a tar (uncompressed or gzip) of a checkpoint directory.

The archive holds the checkpoint's files at its root (``tar -C CHECKPOINT_DIR -cf out.tar .``),
checked against an allow-list: ``config.json`` (UTF-8 JSON within size, depth and digit limits,
valid Unicode), ``*.safetensors`` files (their headers parsed within the same limits) and the
optional UTF-8 text files of ``TEXT_FILES``; ``model.safetensors`` and ``config.json`` are
required. Anything else is refused, so no pickle of any protocol gets in. Only regular files and
directories with relative names are allowed (no links, devices, absolute paths or ``..``). The
unpacked size is capped and the archive must end with its end-of-archive marker. Loading a
registry artifact must never run code.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import IO, Any, BinaryIO

from draftopd.wire.formats import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, is_pickle_name
from draftopd.wire.text import invalid_text_path
from services.registry.errors import ArtifactTooLargeError, InvalidArtifactError

CHUNK_BYTES = 1 << 20
MAX_CONFIG_BYTES = 16 << 20
MAX_JSON_DEPTH = 64  # config.json and safetensors headers nest a few levels at most
MAX_TEXT_BYTES = 1 << 20
TEXT_FILES = frozenset({"README.md", "LICENSE", "NOTICE", "trainer_state.json"})
TAR_BLOCK = 512
MAX_UNPACK_RATIO = 20
MIN_UNPACKED_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


def looks_like_pickle(head: bytes) -> bool:
    """Pickle protocols 2-5 start with PROTO (0x80) and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def refuse_pickle_name(name: str) -> None:
    if is_pickle_name(name):
        raise InvalidArtifactError(
            f"{name!r} looks like a pickle file ({', '.join(PICKLE_SUFFIXES)} are refused); "
            "upload safetensors weights"
        )


def _refuse_pickle_bytes(head: bytes, what: str) -> None:
    if looks_like_pickle(head):
        raise InvalidArtifactError(f"{what} is pickle data; upload safetensors weights")
    if head.startswith(ZIP_MAGIC):
        raise InvalidArtifactError(
            f"{what} is a zip archive (torch.save format?); upload a tar of safetensors weights"
        )


def upload_chunks(stream: BinaryIO, *, max_bytes: int) -> Iterator[bytes]:
    """The upload in chunks; refuses pickle/zip content at the first chunk and sizes over
    ``max_bytes`` as soon as they are passed."""
    total = 0
    while chunk := stream.read(CHUNK_BYTES):
        if total == 0:
            _refuse_pickle_bytes(chunk[:4], "the uploaded file")
        total += len(chunk)
        if total > max_bytes:
            raise ArtifactTooLargeError(f"the artifact is larger than {max_bytes} bytes")
        yield chunk
    if total == 0:
        raise InvalidArtifactError("the uploaded file is empty")


def media_type(head: bytes) -> str:
    return "application/gzip" if head.startswith(GZIP_MAGIC) else "application/x-tar"


def member_name(member: tarfile.TarInfo) -> str:
    """The member's path relative to the archive root ('' for the root itself)."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidArtifactError(f"archive member {member.name!r} escapes the checkpoint dir")
    return "/".join(part for part in path.parts if part != ".")


def _check_safetensors(stream: IO[bytes], size: int, name: str = WEIGHTS_FILE) -> None:
    raw = stream.read(8)
    length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
        raise InvalidArtifactError(f"{name} has no valid safetensors header")
    header = parse_json(stream.read(length), f"{name}'s safetensors header")
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) and "dtype" in v and "data_offsets" in v
        for k, v in header.items()
        if k != "__metadata__"
    ):
        raise InvalidArtifactError(f"{name}: the safetensors header is malformed")


def _refuse_constant(name: str) -> Any:
    raise InvalidArtifactError(f"{CONFIG_FILE} contains {name}, which JSON does not allow")


def _read_config(stream: IO[bytes], size: int) -> dict[str, Any]:
    if size > MAX_CONFIG_BYTES:
        raise InvalidArtifactError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    config = parse_json(stream.read(), CONFIG_FILE)
    if not isinstance(config, dict):
        raise InvalidArtifactError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def parse_json(data: bytes, what: str) -> Any:
    """JSON that the registry can store and serve back: UTF-8, no NaN/Infinity, nesting within
    ``MAX_JSON_DEPTH``, integers within the interpreter's digit limit, no lone surrogates."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError as err:
        raise InvalidArtifactError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from err
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise InvalidArtifactError(f"{what} is not valid JSON ({err})") from err
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidArtifactError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    where = invalid_text_path(value)
    if where is not None:
        raise InvalidArtifactError(f"{what} holds text that is not valid Unicode at {where}")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> dict[str, Any]:
    """Checks one regular file against the allow-list; returns the parsed config for
    ``config.json``, else {}."""
    refuse_pickle_name(name)
    kind = allowed_kind(name)
    stream = tar.extractfile(member)
    if stream is None:  # only for non-regular members, which the caller has refused
        raise InvalidArtifactError(f"archive member {name!r} cannot be read")
    with stream:
        if kind == "safetensors":  # the first 8 bytes are a header length, which may look like
            _check_safetensors(stream, member.size, name)  # a pickle opcode: parse the header
            return {}
        if kind == "config":
            return _read_config(stream, member.size)
        _check_text(stream, member.size, name)
    return {}


def allowed_kind(name: str) -> str:
    """What an archive member may be, by its name: ``config`` (config.json), ``safetensors``
    (``*.safetensors`` at the root) or ``text`` (the optional files of ``TEXT_FILES``). Anything
    else is refused: the archive is checked against an allow-list, not a deny-list."""
    if name == CONFIG_FILE:
        return "config"
    if "/" not in name and name.endswith(".safetensors") and len(name) > len(".safetensors"):
        return "safetensors"
    if name in TEXT_FILES:
        return "text"
    raise InvalidArtifactError(
        f"archive member {name!r} is not allowed: an artifact holds {CONFIG_FILE}, *.safetensors "
        f"files and optionally {', '.join(sorted(TEXT_FILES))} at its root"
    )


def _check_text(stream: IO[bytes], size: int, name: str) -> None:
    if size > MAX_TEXT_BYTES:
        raise InvalidArtifactError(f"{name} is larger than {MAX_TEXT_BYTES} bytes")
    try:
        stream.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArtifactError(f"{name} is not UTF-8 text ({err})") from err


def _scan(tar: tarfile.TarFile, max_bytes: int) -> dict[str, Any]:
    seen: set[str] = set()
    config: dict[str, Any] | None = None
    total = 0
    for member in tar:
        total += member.size
        if total > max_bytes:
            raise ArtifactTooLargeError(f"the artifact unpacks to more than {max_bytes} bytes")
        name = member_name(member)
        if member.isdir():
            continue
        if not member.isfile():
            raise InvalidArtifactError(
                f"archive member {member.name!r} is not a regular file or directory "
                "(links and devices are refused)"
            )
        if name in seen:
            raise InvalidArtifactError(f"archive member {name!r} appears twice")
        seen.add(name)
        parsed = _check_member(tar, member, name)
        if name == CONFIG_FILE:
            config = parsed
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if n not in seen]
    if missing or config is None:
        raise InvalidArtifactError(
            f"the archive lacks {', '.join(missing)} at its root; archive the checkpoint "
            "directory's contents (tar -C CHECKPOINT_DIR -cf out.tar .)"
        )
    return config


def unpacked_limit(archive_bytes: int, max_bytes: int) -> int:
    """How large an archive of ``archive_bytes`` may unpack: at most ``MAX_UNPACK_RATIO`` times
    its size (safetensors weights barely compress; a bomb of zeros compresses a thousandfold),
    never under ``MIN_UNPACKED_BYTES`` (small configs compress well too), and never over the
    ``max_bytes`` setting."""
    return min(max(archive_bytes * MAX_UNPACK_RATIO, MIN_UNPACKED_BYTES), max_bytes)


def inspect_checkpoint_archive(fileobj: BinaryIO, *, max_bytes: int) -> dict[str, Any]:
    """Validate the archive (see the module docstring); returns its parsed ``config.json``.
    ``max_bytes`` caps the unpacked size (a gzip bomb is refused while it is read)."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            config = _scan(tar, max_bytes)
            _check_end_marker(tar)
            return config
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise InvalidArtifactError(
            f"not a readable tar archive (uncompressed or gzip): {err}"
        ) from err


def _check_end_marker(tar: tarfile.TarFile) -> None:
    """A tar ends with two zero blocks; one cut short (a truncated upload) lacks them."""
    stream = tar.fileobj
    assert stream is not None
    stream.seek(tar.offset)
    if stream.read(2 * TAR_BLOCK) != bytes(2 * TAR_BLOCK):
        raise InvalidArtifactError("the archive is truncated: it has no end-of-archive marker")
