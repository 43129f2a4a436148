"""Training prompts written by the target itself (self-instruct from the chat template).

An instruct target given only the start of a user turn (its chat template up to where the user's
text goes) writes a plausible user request, then closes the turn. Sampling that many times gives
prompts in the target's own idea of its traffic: more varied than the built-in corpus templates,
and never copied from a benchmark (each one still passes the MT-Bench overlap filter). This is the
"Magpie" recipe; docs/training.md says when to use it.

``self_instruct`` appends to a JSONL file the bench and ``--prompts`` read, one batch at a time, so
an interrupted run resumes where it stopped and a rerun with the same settings writes the same
prompts. Kept: turns the target closed itself (not cut by ``max_new_tokens``), at least
``min_chars`` long, new after normalisation, clear of MT-Bench.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from draftopd.models.lean_batch import batched_sample
from draftopd.models.target import TargetModel
from draftopd.training.data.corpus import BenchmarkFilter, normalise
from draftopd.training.data.regenerate import _generation_config, _pad_token_id, _seeded

logger = logging.getLogger(__name__)

CATEGORY = "self-instruct"
_SENTINEL = "\u2063SELF-INSTRUCT\u2063"  # a user text no template contains
MAX_EMPTY_BATCHES = 20  # consecutive batches that add nothing before giving up
ROUND = 4  # on the lean engine a batch samples ROUND * batch_size requests through batch_size slots


@dataclass
class SelfInstructStats:
    kept: int  # prompts in the file at the end
    added: int  # written by this call
    batches: int  # sampled by this call
    seconds: float
    tokens: int  # sampled tokens (the target's work)
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count

    def summary(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "kept": self.kept, "added": self.added, "batches": self.batches,
            "seconds": round(self.seconds, 1), "tokens_per_s": round(rate, 1),
            "rejected": dict(self.rejected),
        }  # fmt: skip


def query_prefix(target: TargetModel) -> list[int]:
    """Token ids of the chat template up to the start of the first user turn's text."""
    tokenizer: Any = target.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"target {target.name!r} has no chat template: self-instruct needs an instruct target"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    if not isinstance(text, str) or _SENTINEL not in text:
        raise ValueError("the chat template does not place the user's text verbatim")
    ids = tokenizer(text[: text.index(_SENTINEL)], add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def self_instruct(
    target: TargetModel,
    out: str | Path,
    *,
    count: int,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 0.95,
    min_chars: int = 16,
    benchmark: BenchmarkFilter | None = None,
) -> SelfInstructStats:
    """Sample user requests from ``target`` until ``out`` holds ``count`` of them."""
    if count < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("count, batch_size and max_new_tokens must be positive")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError("self-instruct samples: temperature must be > 0 and top_p in (0, 1]")
    path = Path(out)
    settings = {
        "source": CATEGORY, "target": target.name,
        "dtype": str(target.dtype).removeprefix("torch."), "seed": seed,
        "temperature": float(temperature), "top_p": float(top_p),
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
    }  # fmt: skip
    seen, next_batch = _resume(path, settings)
    benchmark = benchmark if benchmark is not None else BenchmarkFilter.from_mtbench()
    prefix = query_prefix(target)
    eos = target.eos_token_ids
    config = _generation_config(max_new_tokens, temperature, top_p, _pad_token_id(target), eos)
    stats = SelfInstructStats(kept=len(seen), added=0, batches=0, seconds=0.0, tokens=0)
    start = time.perf_counter()
    empty = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        while stats.kept < count:
            batch = next_batch + stats.batches
            sampled = _sample_batch(target, prefix, batch_size, config, seed * 1_000_003 + batch)
            stats.batches += 1
            lines = []
            for row in sampled:
                text, closed, used = _decode(target, row, eos)
                stats.tokens += used
                reason = _reject(text, closed, min_chars, seen, benchmark)
                if reason is not None:
                    stats.rejected[reason] += 1
                    continue
                seen.add(normalise(text))
                lines.append(_record(text, {**settings, "batch": batch}))
                if stats.kept + len(lines) == count:
                    break
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
            handle.flush()
            stats.kept += len(lines)
            stats.added += len(lines)
            empty = 0 if lines else empty + 1
            if empty == MAX_EMPTY_BATCHES:
                raise ValueError(
                    f"{MAX_EMPTY_BATCHES} batches in a row gave no new prompt "
                    f"(rejected: {dict(stats.rejected)}); raise max_new_tokens or temperature"
                )
    stats.seconds = time.perf_counter() - start
    logger.info("self-instruct %s: %s", path, stats.summary())
    return stats


def _sample_batch(
    target: TargetModel, prefix: list[int], size: int, config: Any, seed: int
) -> list[list[int]]:
    """Sampled continuations of ``prefix``: ``size * ROUND`` through ``size`` slots with the lean
    engine's continuous batching where
    the target supports it (a finished request hands its slot to the next at once), else
    ``size`` with ``generate``. Either way the batch's seed fixes its samples."""
    if target.step == "lean":  # a round of ROUND batches keeps the slots busy
        generator = torch.Generator(device=target.device).manual_seed(seed)
        return batched_sample(
            target.lean,
            [prefix] * (size * ROUND),
            max_new_tokens=config.max_new_tokens,
            slots=size,
            temperature=config.temperature,
            top_p=config.top_p,
            generator=generator,
            eos=target.eos_token_ids,
        )
    with _seeded(target.device, seed), torch.inference_mode():
        ids = torch.tensor([prefix] * size, device=target.device)
        out = target.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    return [row[len(prefix) :] for row in out.tolist()]


def _resume(path: Path, settings: dict[str, Any]) -> tuple[set[str], int]:
    """The normalised prompts already in ``path`` and the batch to sample first; the file's settings
    must match (another seed or temperature would make a different file)."""
    seen: set[str] = set()
    next_batch = 0
    if not path.is_file():
        return seen, next_batch
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        provenance = record.get("provenance", {})
        mismatch = {k: v for k, v in settings.items() if provenance.get(k) != v}
        if mismatch:
            raise ValueError(
                f"{path} line {line_no} was written with other settings ({sorted(mismatch)}); "
                "write to a new file"
            )
        seen.add(normalise(record["prompt"]))
        next_batch = max(next_batch, int(provenance["batch"]))
    # the last batch again: it may have stopped at the count; what it already gave is a duplicate
    return seen, next_batch


def _decode(target: TargetModel, row: list[int], eos: frozenset[int]) -> tuple[str, bool, int]:
    """(the request's text, whether the target closed the turn itself, tokens used)."""
    end = next((i for i, t in enumerate(row) if t in eos), None)
    body = row if end is None else row[:end]
    tokenizer: Any = target.tokenizer
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return text, end is not None, len(row) if end is None else end + 1


def _reject(
    text: str, closed: bool, min_chars: int, seen: set[str], benchmark: BenchmarkFilter
) -> str | None:
    if not closed:
        return "unfinished"
    if len(text) < min_chars:
        return "short"
    if normalise(text) in seen:
        return "duplicate"
    overlap = benchmark.reason(text)
    return None if overlap is None else f"mtbench-{overlap}"


def _record(text: str, provenance: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(normalise(text).encode()).hexdigest()[:12]
    return {"id": f"{CATEGORY}-{digest}", "prompt": text, "category": CATEGORY,
            "provenance": provenance}  # fmt: skip


__all__ = ["CATEGORY", "SelfInstructStats", "query_prefix", "self_instruct"]
