"""The per-step cost table (``draftopd bench --costs``): what one cycle of each path costs.

Speculative decoding pays when a cycle (drafting K tokens, then one target forward of K + 1)
costs little more than a plain step (a target forward of 1). This measures, in one run:
- the target forward of T = 1..16 new tokens at a few context lengths, for each decode step
  (``hf``: Hugging Face's forward and DynamicCache; ``lean``: models/lean_llama.py), with the
  ratio to the same step's 1-token forward;
- one EAGLE-3 drafting call of k tokens (the proposer's whole ``propose``);
- the memory floor: how long reading the target's weight bytes once takes here;
- per K, a whole cycle (drafting K, the target forward of K + 1, the crop) timed as the engine
  runs it, over a plain step timed in the same loop: the tau a drafter needs to break even, and
  1 / the speed ratio of a tau = 1 drafter. (Drafting timed alone reads weights the previous
  call left in the cache; in a real cycle the target's weight stream has evicted them.)

Cells are timed interleaved (every step kind and block size once per round, for ``repeats``
rounds) and reported as medians, so machine drift hits them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel, crop_cache
from draftopd.speculative.sampling import SamplingParams

COST_BLOCKS = (1, 2, 3, 4, 5, 6, 8, 12, 16)  # T, new tokens per target forward
COST_CONTEXTS = (200, 1000)  # tokens already in the KV cache
DRAFT_LENGTHS = (1, 4, 7)  # k of the timed drafting calls
CYCLE_KS = (2, 4, 7)  # K of the timed whole cycles
FAMILY_NAMES = {"eagle3": "EAGLE-3", "dflash": "DFlash"}


@dataclass(frozen=True)
class CostPlan:
    steps: tuple[str, ...] = ("hf", "lean")
    contexts: tuple[int, ...] = COST_CONTEXTS
    blocks: tuple[int, ...] = COST_BLOCKS
    repeats: int = 15
    seed: int = 0
    draft_weights: str = "auto"  # the drafter's decode-time weights (Drafter.proposer)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _target_cells(
    target: TargetModel, ids: torch.Tensor, plan: CostPlan, context: int
) -> dict[str, dict[int, float]]:
    """{step: {T: median ms}} of forwards of T tokens after ``context`` cached tokens."""
    caches = {}
    for step in plan.steps:
        cache = target.new_decode_cache(step)
        target.forward(ids[:, :context], cache, last_logits_only=True)
        caches[step] = cache
    samples: dict[str, dict[int, list[float]]] = {s: {t: [] for t in plan.blocks} for s in caches}

    def forward(step: str, block: int) -> None:
        target.forward(ids[:, context : context + block], caches[step], want_features=True)
        crop_cache(caches[step], context)

    for step in caches:  # one untimed pass: lazy allocation and kernel warm-up
        for block in plan.blocks:
            forward(step, block)
    for _ in range(plan.repeats):
        for step in caches:
            for block in plan.blocks:
                samples[step][block].append(_timed(partial(forward, step, block), target.device))
    return {s: {t: _median_ms(v) for t, v in cells.items()} for s, cells in samples.items()}


@dataclass(frozen=True)
class _DraftCells:
    draft_ms: dict[int, float]  # one propose(k) alone, repeated (the drafter's weights stay cached)
    cycle_ms: dict[int, float]  # propose(K) + target forward of K + 1 + crop, as the engine runs
    plain_ms: float  # a plain step in the same loop (target forward of 1 + crop)


def _lengths(drafter: Drafter) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The k of the timed drafting calls and the K of the timed cycles: the defaults, capped at
    what one cycle of ``drafter`` can propose, plus that most (a block drafter's B - 1)."""
    cap = drafter.max_draft_tokens
    if cap is None:
        return DRAFT_LENGTHS, CYCLE_KS
    lengths = sorted({min(k, cap) for k in DRAFT_LENGTHS} | {cap})
    return tuple(lengths), tuple(sorted({min(k, cap) for k in CYCLE_KS} | {cap}))


def _drafter_cells(
    target: TargetModel, drafter: Drafter, ids: torch.Tensor, plan: CostPlan, context: int
) -> _DraftCells:
    """Drafting alone, and whole cycles timed as the engine runs them: between two drafting calls
    the target streams its weights, which evicts the drafter's from the cache (a tau = 1 drafter:
    one committed token per cycle)."""
    lengths, cycle_ks = _lengths(drafter)
    prompt = ids[0, :context].tolist()
    cache = target.new_decode_cache()
    out = target.forward(ids[:, : context - 1], cache, want_features=True, last_logits_only=True)
    assert out.features is not None
    proposer = drafter.proposer(weights=plan.draft_weights)
    proposer.start(prompt, out.features[0])
    params = SamplingParams(max_new_tokens=max(lengths) + 1)
    proposer.propose(prompt, 1, params, None)  # consumes the prompt's features
    last = out.features[0, -1:]  # [1, 3H]: stands in for the committed token's feature
    draft: dict[int, list[float]] = {k: [] for k in lengths}
    cycle: dict[int, list[float]] = {k: [] for k in cycle_ks}
    plain: list[float] = []

    history = list(prompt)  # the drafter's context grows by one committed token a call (tau = 1)

    def propose(k: int) -> list[int]:
        proposer.commit([history[-1]], last)
        history.append(history[-1])
        return proposer.propose(history, k, params, None).tokens

    def run_cycle(k: int) -> None:
        block = torch.tensor([[prompt[-1], *propose(k)]], device=target.device)  # [1, k + 1]
        target.forward(block, cache, want_features=True)
        crop_cache(cache, context - 1)

    def plain_step() -> None:
        target.forward(ids[:, context - 1 : context], cache, want_features=True)
        crop_cache(cache, context - 1)

    for k in lengths:
        propose(k)
    for _ in range(plan.repeats):
        for k in lengths:
            draft[k].append(_timed(partial(propose, k), target.device))
        for k in cycle_ks:
            plain.append(_timed(plain_step, target.device))
            cycle[k].append(_timed(partial(run_cycle, k), target.device))
    return _DraftCells(
        draft_ms={k: _median_ms(v) for k, v in draft.items()},
        cycle_ms={k: _median_ms(v) for k, v in cycle.items()},
        plain_ms=_median_ms(plain),
    )


@torch.inference_mode()
def measure_costs(
    target: TargetModel, drafter: Drafter | None, plan: CostPlan | None = None
) -> dict[str, Any]:
    """The cost table as a JSON-ready dict (see ``format_costs``)."""
    plan = plan or CostPlan()
    generator = torch.Generator().manual_seed(plan.seed)
    width = max(plan.contexts) + max(plan.blocks)
    ids = torch.randint(0, target.vocab_size, (1, width), generator=generator)
    ids = ids.to(target.device)  # [1, width]
    table: dict[str, Any] = {
        "drafter": drafter.cfg.architecture if drafter is not None else None,
        "steps": list(plan.steps),
        "repeats": plan.repeats,
        "draft_weights": plan.draft_weights,
        "contexts": {},
    }
    table["weights_mb"] = sum(p.numel() * p.element_size() for p in target.model.parameters()) / 1e6
    table["weight_stream_ms"] = weight_stream_ms(target, plan.repeats)
    for context in plan.contexts:
        forwards = _target_cells(target, ids, plan, context)
        entry: dict[str, Any] = {
            "target_ms": {s: {str(t): ms for t, ms in c.items()} for s, c in forwards.items()},
            "verify_ratio": {
                s: {str(t): ms / c[1] for t, ms in c.items()} for s, c in forwards.items()
            },
        }
        if drafter is not None:
            cells = _drafter_cells(target, drafter, ids, plan, context)
            entry["draft_ms"] = {str(k): ms for k, ms in cells.draft_ms.items()}
            entry["cycle_ms"] = {str(k): ms for k, ms in cells.cycle_ms.items()}
            entry["cycle_plain_ms"] = cells.plain_ms
            entry["cycle_ratio"] = {str(k): ms / cells.plain_ms for k, ms in cells.cycle_ms.items()}
            entry["draft_ratio"] = {str(k): ms / cells.plain_ms for k, ms in cells.draft_ms.items()}
        table["contexts"][str(context)] = entry
    return table


def weight_stream_ms(target: TargetModel, repeats: int) -> float:
    """The memory floor of a 1-token step: median ms to read as many bytes as the target's
    weights (a sum over a buffer of that size, with torch's threads)."""
    numel = sum(p.numel() * p.element_size() for p in target.model.parameters()) // 4
    buffer = torch.ones(numel, dtype=torch.float32, device=target.device)
    buffer.sum()
    samples = [_timed(buffer.sum, target.device) for _ in range(repeats)]
    return _median_ms(samples)


def format_costs(table: dict[str, Any]) -> str:
    """A fixed-width rendering of ``measure_costs``'s table."""
    lines = [
        f"memory floor: reading the {table['weights_mb']:.0f} MB of weights once takes "
        f"{table['weight_stream_ms']:.1f} ms",
        "",
    ]
    for context, entry in table["contexts"].items():
        lines.append(f"context {context} tokens (median ms of {table['repeats']} rounds)")
        blocks = list(next(iter(entry["target_ms"].values())))
        lines.append(f"{'target forward of T':<22}" + "".join(f"{'T=' + b:>8}" for b in blocks))
        for step, cells in entry["target_ms"].items():
            lines.append(f"{step:<22}" + "".join(f"{cells[b]:>8.1f}" for b in blocks))
            ratio = entry["verify_ratio"][step]
            lines.append(f"{'  / T=1':<22}" + "".join(f"{ratio[b]:>8.2f}" for b in blocks))
        if "draft_ms" in entry:
            family = FAMILY_NAMES.get(table.get("drafter") or "eagle3", "drafter")
            drafts = ", ".join(
                f"k={k}: {ms:.1f}"
                + (f" ({entry['draft_ratio'][k]:.2f}x)" if "draft_ratio" in entry else "")
                for k, ms in entry["draft_ms"].items()
            )
            lines.append(f"{family} drafting alone, weights cached (ms, x plain step)  {drafts}")
            cycles = ", ".join(
                f"K={k}: {ms:.1f} ms = {entry['cycle_ratio'][k]:.2f}x"
                for k, ms in entry["cycle_ms"].items()
            )
            lines.append(f"whole cycle vs plain step ({entry['cycle_plain_ms']:.1f} ms)  {cycles}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["COST_BLOCKS", "COST_CONTEXTS", "CostPlan", "format_costs", "measure_costs"]
