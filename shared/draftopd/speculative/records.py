"""The rollout record (docs/design.md §3): one Redis Stream entry per generated sequence.

Token lists and cycles travel as one msgpack blob (field ``data``) next to a few small scalar
fields that consumers can filter on without decoding (``schema_version``, ``job_id``,
``drafter_version``, ``target_model``).

Memory: msgpack stores a token id below 65536 in 3 bytes; a cycle is packed as a 5-item list
and its log-probs as float32 bytes, so a record costs about 3 * (prompt + response) bytes plus, per
cycle, 3 * (proposed + committed) + 4 * rejected + ~12 bytes (``record_size_bound``; a test checks
real records against it). Example: 512 prompt + 512 response tokens at tau = 2, K = 4 (256 cycles)
is at most ~3.1 KB + 256 * 40 B = ~13 KB, so a job stream capped at 10,000 records holds ~130 MB.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:  # torch-free at run time: the rollout queue and the registry side use records
    from draftopd.speculative.engine import GenerationResult
    from draftopd.speculative.sampling import SamplingParams

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Cycle:
    """One draft-verify cycle as recorded for Draft-OPD (docs/design.md §3)."""

    anchor: int  # response index of the last committed token when drafting began; -1 = prompt
    proposed: list[int]  # d_1..d_k
    accepted: int  # m
    committed: list[int]  # d_1..d_m + bonus
    rejected_teacher_logprobs: list[float]  # log p(d_j | prefix, d_<j) for j = m+1..k


def _pack_cycle(cycle: Cycle) -> list[Any]:
    """A cycle as [anchor, proposed, accepted, committed, logprobs]: no per-cycle key names, and
    log-probs as little-endian float32 bytes (4 bytes each instead of msgpack's 9 for a double)."""
    values = array("f", cycle.rejected_teacher_logprobs)
    if sys.byteorder == "big":
        values.byteswap()
    return [cycle.anchor, cycle.proposed, cycle.accepted, cycle.committed, values.tobytes()]


def _unpack_cycle(packed: list[Any]) -> Cycle:
    anchor, proposed, accepted, committed, raw = packed
    logprobs = array("f")
    logprobs.frombytes(raw)
    if sys.byteorder == "big":
        logprobs.byteswap()
    return Cycle(
        anchor=anchor,
        proposed=proposed,
        accepted=accepted,
        committed=committed,
        rejected_teacher_logprobs=logprobs.tolist(),
    )


def stream_key(job_id: str) -> str:
    """Redis Stream key of a job's rollouts."""
    return f"draftopd:rollouts:{job_id}"


def record_size_bound(num_tokens: int, cycles: list[Cycle]) -> int:
    """Upper bound in bytes of a record's ``data`` blob (tokens < 65536), for capacity planning."""
    per_cycle = sum(
        3 * (len(c.proposed) + len(c.committed)) + 4 * len(c.rejected_teacher_logprobs) + 12
        for c in cycles
    )
    return 3 * num_tokens + per_cycle + 128


@dataclass(frozen=True)
class RolloutRecord:
    job_id: str
    drafter_version: str
    target_model: str
    sampling: dict[str, Any]  # temperature, top_p, top_k, seed
    prompt_ids: list[int]
    response_ids: list[int]  # every committed token: the concatenation of cycles' ``committed``
    cycles: list[Cycle]
    output_len: int  # tokens returned to the caller (<= len(response_ids): cut at EOS/stop)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(
        cls,
        result: GenerationResult,
        params: SamplingParams,
        *,
        job_id: str,
        drafter_version: str,
        target_model: str,
    ) -> RolloutRecord:
        if result.cycles is None:
            raise ValueError("the generation was not recorded: pass record=True to the engine")
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
        }
        return cls(
            job_id=job_id,
            drafter_version=drafter_version,
            target_model=target_model,
            sampling=sampling,
            prompt_ids=list(result.prompt_ids),
            response_ids=list(result.committed_ids),
            cycles=list(result.cycles),
            output_len=len(result.token_ids),
        )

    def to_fields(self) -> dict[str, bytes | str | int]:
        """Flat fields for XADD."""
        blob = {
            "sampling": self.sampling,
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "cycles": [_pack_cycle(c) for c in self.cycles],
            "output_len": self.output_len,
            "extra": self.extra,
        }
        return {
            "schema_version": self.schema_version,
            "job_id": self.job_id,
            "drafter_version": self.drafter_version,
            "target_model": self.target_model,
            "data": msgpack.packb(blob),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> RolloutRecord:
        """Parse an XREAD entry (keys and values may be bytes)."""
        norm = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}

        def text(key: str) -> str:
            value = norm[key]
            return value.decode() if isinstance(value, bytes) else str(value)

        version = int(text("schema_version"))
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"rollout record schema_version {version}; supported: {SCHEMA_VERSION}"
            )
        blob = msgpack.unpackb(norm["data"], raw=False)
        return cls(
            job_id=text("job_id"),
            drafter_version=text("drafter_version"),
            target_model=text("target_model"),
            sampling=blob["sampling"],
            prompt_ids=blob["prompt_ids"],
            response_ids=blob["response_ids"],
            cycles=[_unpack_cycle(c) for c in blob["cycles"]],
            output_len=blob["output_len"],
            schema_version=version,
            extra=blob.get("extra", {}),
        )
