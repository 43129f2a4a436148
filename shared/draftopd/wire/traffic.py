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
import time
from dataclasses import dataclass
from typing import Any

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
        text = {_text(k): _text(v) for k, v in fields.items()}
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
    return _text(entry)


def read(
    client: Any, *, stream: str = TRAFFIC_STREAM, after: str = "0", count: int | None = None
) -> list[tuple[str, TrafficRecord]]:
    """Entries after id ``after`` (exclusive), oldest first; malformed ones are skipped."""
    start = "(" + after if after != "0" else "-"
    entries: Any = client.xrange(stream, min=start, max="+", count=count)
    out = []
    for entry_id, fields in entries:
        try:
            out.append((_text(entry_id), TrafficRecord.from_fields(fields)))
        except ValueError:
            continue
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["TRAFFIC_STREAM", "TrafficRecord", "append", "read"]
