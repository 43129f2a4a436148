"""Captured traffic: prompts the inference service served, sampled into a Redis stream (opt-in).

The inference service appends one entry per sampled, finished request to ``TRAFFIC_STREAM``
(capped by length and age); a ``draft_opd`` train job with ``prompts: {"source": "traffic"}``
reads them back as training prompts (issue #17; docs/traffic.md). Prompts are user data: the
stream is the only place they are written, never a log.

Fields of an entry (all strings):
- ``prompt_ids``: JSON list, the token ids the target was given (chat template applied);
- ``drafter_version``: what served it (a registry version, "ngram" or "" for plain decoding);
- ``method``, ``endpoint``: the speculative method and the route;
- ``tau``, ``cycles``, ``completion_tokens``: how the request went;
- ``captured_at``: Unix seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftopd.wire.text import decoded

TRAFFIC_STREAM = "draftopd:traffic"


@dataclass(frozen=True)
class TrafficRecord:
    prompt_ids: list[int]
    drafter_version: str
    method: str
    endpoint: str
    tau: float
    cycles: int
    completion_tokens: int
    captured_at: float

    @property
    def key(self) -> str:
        """De-duplication key: a hash of the prompt's token ids."""
        return hashlib.sha256(json.dumps(self.prompt_ids).encode()).hexdigest()[:16]

    def to_fields(self) -> dict[str, str]:
        return {
            "prompt_ids": json.dumps(self.prompt_ids),
            "drafter_version": self.drafter_version,
            "method": self.method,
            "endpoint": self.endpoint,
            "tau": repr(float(self.tau)),
            "cycles": str(int(self.cycles)),
            "completion_tokens": str(int(self.completion_tokens)),
            "captured_at": repr(float(self.captured_at)),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> TrafficRecord:
        text = {decoded(k): decoded(v) for k, v in fields.items()}
        try:
            ids = json.loads(text["prompt_ids"])
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise ValueError("prompt_ids must be a non-empty list of token ids")
            return cls(
                prompt_ids=ids,
                drafter_version=text.get("drafter_version", ""),
                method=text.get("method", ""),
                endpoint=text.get("endpoint", ""),
                tau=float(text.get("tau", "0")),
                cycles=int(text.get("cycles", "0")),
                completion_tokens=int(text.get("completion_tokens", "0")),
                captured_at=float(text.get("captured_at", "0")),
            )
        except (KeyError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"malformed traffic entry: {err}") from err


def append(
    client: Any, record: TrafficRecord, *, maxlen: int, retention_s: float, stream: str
) -> str:
    """Add ``record``; entries beyond ``maxlen`` or older than ``retention_s`` are trimmed, in
    the same transaction. Returns the entry id."""
    oldest_ms = int((time.time() - retention_s) * 1000)
    pipe = client.pipeline(transaction=True)
    pipe.xadd(stream, record.to_fields(), maxlen=maxlen, approximate=False)
    pipe.xtrim(stream, minid=f"{max(oldest_ms, 0)}-0", approximate=False)
    entry, _ = pipe.execute()
    return decoded(entry)


def read(
    client: Any, *, stream: str = TRAFFIC_STREAM, after: str = "0", count: int | None = None
) -> list[tuple[str, TrafficRecord]]:
    """Entries after id ``after`` (exclusive), oldest first; malformed ones are skipped."""
    start = "(" + after if after != "0" else "-"
    entries: Any = client.xrange(stream, min=start, max="+", count=count)
    out = []
    for entry_id, fields in entries:
        try:
            out.append((decoded(entry_id), TrafficRecord.from_fields(fields)))
        except ValueError:
            continue
    return out


TRAFFIC_REF_PREFIX = "traffic://"
SOURCE_KEYS = ("source", "stream", "min_prompts", "max_prompts")


@dataclass(frozen=True)
class TrafficSource:
    """Where a train job takes its prompts from captured traffic. In a job spec it is written
    ``"prompts": {"source": "traffic", "stream": ..., "min_prompts": N, "max_prompts": M}`` and
    stored as its reference ``traffic://STREAM?min_prompts=N&max_prompts=M``."""

    stream: str = TRAFFIC_STREAM
    min_prompts: int = 1  # fewer distinct prompts than this fails the job (nothing to learn)
    max_prompts: int | None = None  # the newest M distinct prompts; None = all

    def __post_init__(self) -> None:
        if not self.stream or "?" in self.stream:
            raise ValueError(f"traffic stream name {self.stream!r} is empty or has a '?'")
        if self.min_prompts < 1 or (self.max_prompts is not None and self.max_prompts < 1):
            raise ValueError("min_prompts and max_prompts must be >= 1")
        if self.max_prompts is not None and self.max_prompts < self.min_prompts:
            raise ValueError("max_prompts must be >= min_prompts")

    def to_ref(self) -> str:
        query = f"min_prompts={self.min_prompts}"
        if self.max_prompts is not None:
            query += f"&max_prompts={self.max_prompts}"
        return f"{TRAFFIC_REF_PREFIX}{self.stream}?{query}"

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TrafficSource:
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown or spec.get("source") != "traffic":
            raise ValueError(
                f"prompts: expected {{'source': 'traffic', 'stream', 'min_prompts', "
                f"'max_prompts'}}, got source={spec.get('source')!r}, unknown keys {unknown}"
            )
        try:
            return cls(
                stream=str(spec.get("stream", TRAFFIC_STREAM)),
                min_prompts=int(spec.get("min_prompts", 1)),
                max_prompts=None if spec.get("max_prompts") is None else int(spec["max_prompts"]),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"prompts: {err}") from err


def parse_traffic_ref(value: str | None) -> TrafficSource | None:
    """The source of a ``traffic://`` reference; None for anything else (a file path)."""
    if not value or not value.startswith(TRAFFIC_REF_PREFIX):
        return None
    stream, _, query = value[len(TRAFFIC_REF_PREFIX) :].partition("?")
    pairs = dict(part.partition("=")[::2] for part in query.split("&") if part)
    return TrafficSource.from_spec({"source": "traffic", "stream": stream, **pairs})


def snapshot(client: Any, source: TrafficSource, path: str | Path) -> int:
    """Write the distinct captured prompts of ``source`` to ``path`` as prompt JSONL
    (``prompt_ids`` lines, oldest first; the last ones are the newest, which a held-out split
    takes). A path that exists already is kept (a resumed job trains on the same prompts).
    Returns the number of prompts; ValueError if fewer than ``min_prompts``."""
    out = Path(path)
    if out.is_file():
        return sum(1 for line in out.read_text().splitlines() if line.strip())
    seen: dict[str, tuple[str, TrafficRecord]] = {}
    for entry_id, record in read(client, stream=source.stream):
        seen.setdefault(record.key, (entry_id, record))  # the first capture of each prompt
    kept = list(seen.items())
    if source.max_prompts is not None:
        kept = kept[-source.max_prompts :]
    if len(kept) < source.min_prompts:
        raise ValueError(
            f"traffic stream {source.stream!r} holds {len(kept)} distinct prompts, "
            f"{source.min_prompts} needed (is capture on? DRAFTOPD_INFERENCE_CAPTURE_RATE)"
        )
    lines = [
        json.dumps(
            {
                "id": f"traffic-{key}",
                "prompt_ids": r.prompt_ids,
                "entry": entry_id,
                "drafter_version": r.drafter_version,
                "captured_at": r.captured_at,
            }
        )
        for key, (entry_id, r) in kept
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return len(lines)


__all__ = [
    "TRAFFIC_REF_PREFIX",
    "TRAFFIC_STREAM",
    "TrafficRecord",
    "TrafficSource",
    "append",
    "parse_traffic_ref",
    "read",
    "snapshot",
]
