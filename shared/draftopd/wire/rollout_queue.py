"""Rollout requests over Redis Streams: the trainer enqueues them, rollout workers share them.

Keys and groups:
- ``REQUEST_STREAM`` holds every job's rollout requests; the workers read it through the consumer
  group ``WORKER_GROUP``, so each request is delivered to one worker.
- A request's records go to the job's stream (``records.stream_key(job_id)``, docs/design.md §3),
  capped
  at ``maxlen`` entries (approximate trimming).

Exactly once: a worker publishes a request's records with one Lua script that first acknowledges
(and deletes) the request and writes the records only if that acknowledgement succeeded. If a
worker dies before publishing, its request stays pending and another worker claims it after
``claim_idle_ms`` (XAUTOCLAIM). If a slow worker and the one that reclaimed its request both
finish, only the first publish writes records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis

from draftopd.speculative.records import RolloutRecord, stream_key
from draftopd.training.configs import ROLLOUT_MODES
from draftopd.wire.text import decoded

REQUEST_STREAM = "draftopd:rollout-requests"
WORKER_GROUP = "rollout-workers"
DEAD_LETTER_STREAM = "draftopd:rollout-requests:dead"  # requests that failed max_attempts times
DEFAULT_MAXLEN = 10_000

_PUBLISH = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local per = tonumber(ARGV[4])
for i = 5, #ARGV, per do
  local args = {KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
  for j = 0, per - 1 do args[#args + 1] = ARGV[i + j] end
  redis.call('XADD', unpack(args))
end
return 1
"""


@dataclass(frozen=True)
class RolloutRequest:
    job_id: str
    request_id: str  # unique within the job
    drafter_version: str  # the version the records must be made with
    drafter_path: str  # where a worker loads it: a checkpoint dir, or "registry://NAME/VERSION"
    prompts: list[list[int]]  # rendered prompt token ids
    num_draft_tokens: int = 5
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seeds: list[int] | None = None  # one per prompt (sampled rollouts)
    mode: str = "engine"  # rollouts.ROLLOUT_MODES: "engine", or "batched" (greedy only)
    batch_size: int = 8  # sequences per pass in the batched mode

    def __post_init__(self) -> None:
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("a rollout request needs non-empty prompts")
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.prompts)} prompts")
        if self.num_draft_tokens < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("num_draft_tokens, max_new_tokens and batch_size must be >= 1")
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"rollout mode {self.mode!r}; allowed: {', '.join(ROLLOUT_MODES)}")

    def to_fields(self) -> dict[str, bytes | str]:
        return {"job_id": self.job_id, "data": msgpack.packb(asdict(self))}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> RolloutRequest:
        norm = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        return cls(**msgpack.unpackb(norm["data"], raw=False))


def dead_letters(
    client: redis.Redis, job_id: str, request_prefix: str = "", *, scan: int = 1_000
) -> list[dict[str, str]]:
    """Dead-lettered requests of ``job_id`` whose id starts with ``request_prefix`` (among the
    newest ``scan`` entries): dicts with ``request_id`` and ``error``."""
    entries: Any = client.xrevrange(DEAD_LETTER_STREAM, count=scan)
    found = []
    for _, fields in entries:
        row = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        if row.get("job_id") == job_id and row.get("request_id", "").startswith(request_prefix):
            found.append(row)
    return found


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise


def enqueue(
    client: redis.Redis, requests: list[RolloutRequest], *, mark: tuple[str, str] | None = None
) -> list[str]:
    """Add ``requests`` to the request stream in one transaction. ``mark=(set_key, member)`` adds
    ``member`` to that set in the same transaction, so a caller killed mid-way never finds its
    mark without its requests (or the reverse)."""
    ensure_group(client, REQUEST_STREAM, WORKER_GROUP)
    pipe = client.pipeline(transaction=True)
    if mark is not None:
        pipe.sadd(mark[0], mark[1])
    for request in requests:
        pipe.xadd(REQUEST_STREAM, request.to_fields())  # type: ignore[arg-type]
    replies = pipe.execute()
    return [decoded(x) for x in replies[1 if mark is not None else 0 :]]


def next_request(
    client: redis.Redis, consumer: str, *, block_ms: int = 1000, claim_idle_ms: int = 60_000
) -> tuple[str, RolloutRequest] | None:
    """The next request for ``consumer``: a stale one (its worker went quiet) first, else a new
    one, waiting up to ``block_ms``. None when there is nothing to do."""
    ensure_group(client, REQUEST_STREAM, WORKER_GROUP)
    claimed: Any = client.xautoclaim(
        REQUEST_STREAM, WORKER_GROUP, consumer, min_idle_time=claim_idle_ms, count=1
    )
    entries: list[Any] = claimed[1] if claimed else []
    entries = [e for e in entries if e and e[1]]  # deleted entries come back as (id, None)
    if not entries:
        reply: Any = client.xreadgroup(
            WORKER_GROUP, consumer, {REQUEST_STREAM: ">"}, count=1, block=block_ms
        )
        entries = reply[0][1] if reply else []
    if not entries:
        return None
    entry_id, fields = entries[0]
    return decoded(entry_id), RolloutRequest.from_fields(fields)


def publish(
    client: redis.Redis,
    entry_id: str,
    request: RolloutRequest,
    records: list[RolloutRecord],
    *,
    maxlen: int = DEFAULT_MAXLEN,
) -> bool:
    """Acknowledge the request and write its records atomically; False (nothing written) when
    the request was already published by another worker."""
    args: list[Any] = [WORKER_GROUP, entry_id, maxlen, 0]
    per = 0
    for record in records:
        flat = [x for pair in record.to_fields().items() for x in pair]
        per = len(flat)
        args.extend(flat)
    args[3] = max(per, 1)
    keys = [REQUEST_STREAM, stream_key(request.job_id)]
    return bool(client.eval(_PUBLISH, len(keys), *keys, *args))


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url`` (within a second)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


__all__ = [
    "DEFAULT_MAXLEN",
    "REQUEST_STREAM",
    "WORKER_GROUP",
    "RolloutRequest",
    "enqueue",
    "ensure_group",
    "next_request",
    "publish",
    "redis_answers",
]
