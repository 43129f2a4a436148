"""The benchmark protocol (docs/design.md §6): plain vs speculative decoding, side by side.

For every prompt, on the same machine and in one run, this measures:
1. plain autoregressive decoding in our engine (no proposer): the baseline;
2. speculative decoding in our engine with the chosen method (eagle3, dflash, ngram or none);
3. with ``peers``: Hugging Face ``generate`` greedy, and ``generate`` with prompt lookup.

The paths run interleaved per prompt, after one untimed warm-up of each, so machine drift hits all
of them alike. The report's top-level keys are a contract other tools read (see ``REPORT_KEYS``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import GenerationConfig

from draftopd.bench_config import (
    DEFAULT_DRAFTER,
    DRAFTER_METHODS,
    BenchConfig,
    parse_drafter_ref,
)
from draftopd.costs import CostPlan, measure_costs, synchronize
from draftopd.models.checkpoint import load_drafter, random_drafter_for
from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel, load_target
from draftopd.prompts import load_prompts, render_prompt
from draftopd.speculative.engine import DecodeEngine, GenerationResult
from draftopd.speculative.proposers import LookupFirstProposer, NgramProposer, Proposer
from draftopd.speculative.sampling import SamplingParams
from draftopd.speculative.tree import DraftTree

logger = logging.getLogger(__name__)

HF_PROMPT_LOOKUP_TOKENS = 10  # prompt_lookup_num_tokens for the HF peer
WARMUP_TOKENS = 16  # new tokens of the untimed warm-up generations
REPORT_KEYS = (
    "tau",
    "speedup",
    "spec_tokens_per_s",
    "baseline_tokens_per_s",
    "identical",
    "num_prompts",
    "acceptance_by_position",
)
PEER_KEYS = ("hf_generate_tokens_per_s", "hf_prompt_lookup_tokens_per_s")


def resolved_device(config: BenchConfig) -> str:
    """The bench's device: as given, else cuda when available, else cpu."""
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class PeerRun:
    """One Hugging Face generate call, timed end to end."""

    token_ids: list[int]  # generated tokens (the prompt removed)
    seconds: float  # wall time of the generate call


@dataclass(frozen=True)
class PromptRun:
    """Everything measured on one prompt."""

    prompt_id: str
    prompt_tokens: int
    baseline: GenerationResult  # our engine, no proposer
    spec: GenerationResult  # our engine, the benchmarked method
    hf_generate: PeerRun | None  # HF greedy generate (with peers)
    hf_prompt_lookup: PeerRun | None  # HF generate(prompt_lookup_num_tokens=10) (with peers)
    extra: dict[str, GenerationResult] = field(default_factory=dict)  # "k=3", "ngram" paths
    category: str | None = None  # the prompt's category, where its file gives one


@dataclass
class _Bench:
    """What a run holds while it measures: the loaded models and the rendered prompts."""

    config: BenchConfig
    target: TargetModel
    engine: DecodeEngine
    drafter: Drafter | None
    prompts: list[tuple[str, list[int], str | None]]  # (prompt id, token ids, category)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark and return the JSON report (docs/design.md §6 keys plus context)."""
    torch.manual_seed(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # oversubscribed CPUs slow torch down many times
    bench = _setup(config)
    if config.warmup:
        _warm_up(bench)
    runs: list[PromptRun] = []
    bar = tqdm(
        bench.prompts, desc=f"bench {config.method}", unit="prompt", disable=not config.progress
    )
    with logging_redirect_tqdm():
        for index, (prompt_id, ids, category) in enumerate(bar):
            runs.append(_measure_prompt(bench, prompt_id, ids, index, category))
    return build_report(config, runs, machine=machine_info(bench.target.device))


def run_costs(config: BenchConfig) -> dict[str, Any]:
    """The per-step cost table (``draftopd bench --costs``, draftopd/costs.py) with the machine.
    Both decode steps are timed where the target supports the lean one."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolved_device(config)
    target = load_target(
        config.target, device=device, dtype=config.dtype, step=config.step, kernel=config.kernel
    )
    family = config.method if config.method in DRAFTER_METHODS else "eagle3"
    drafter = load_drafter_ref(config.drafter or DEFAULT_DRAFTER, target, architecture=family)
    steps = ("hf", "lean") if target.step == "lean" else ("hf",)
    plan = CostPlan(
        steps=steps,
        repeats=max(config.repeats, 5),
        seed=config.seed,
        draft_weights=config.draft_weights,
    )
    table = measure_costs(target, drafter, plan)
    table["target"] = config.target
    table["dtype"] = config.dtype
    table["kernel"] = target.lean.kernel_name if target.step == "lean" else None
    table["machine"] = machine_info(target.device)
    return table


def _setup(config: BenchConfig) -> _Bench:
    prompts = load_prompts(config.prompts, config.limit)
    device = resolved_device(config)
    logger.info("loading target %s on %s (%s)", config.target, device, config.dtype)
    target = load_target(
        config.target, device=device, dtype=config.dtype, step=config.step, kernel=config.kernel
    )
    if target.tokenizer is None:
        raise ValueError(f"target {config.target!r} has no tokenizer; the benchmark needs one")
    rendered = [(p.id, render_prompt(target.tokenizer, p), p.category) for p in prompts]
    drafter = None
    if config.drafter_ref:
        drafter = load_drafter_ref(config.drafter_ref, target, architecture=config.method)
    engine = DecodeEngine(target, num_draft_tokens=config.num_draft_tokens)
    return _Bench(config=config, target=target, engine=engine, drafter=drafter, prompts=rendered)


def load_drafter_ref(ref: str, target: TargetModel, *, architecture: str = "eagle3") -> Drafter:
    parsed = parse_drafter_ref(ref)
    if parsed.path is not None:
        logger.info("loading drafter checkpoint %s", parsed.path)
        drafter = load_drafter(parsed.path, target)
        if drafter.cfg.architecture != architecture:
            raise ValueError(
                f"{parsed.path} holds a {drafter.cfg.architecture} drafter, not {architecture}"
            )
        return drafter
    logger.info(
        "using a random-init %s drafter (seed %d): expect low acceptance", architecture, parsed.seed
    )
    return random_drafter_for(
        target,
        seed=parsed.seed,
        draft_vocab_size=parsed.draft_vocab_size,
        architecture=architecture,
    )


@dataclass(frozen=True)
class _Path:
    """One timed decoder of a run: which proposer, and the K it may draft."""

    method: str  # "ngram", a drafter method, or "none"
    k: int  # the K it reports: the drafter's (or n-gram's) drafts per cycle
    allowed: int  # the K the decode loop allows (with a lookup: max(K, N))
    lookup: int = 0  # N of n-gram lookup ahead of the drafter (0 = none)
    stop_below: float = 0.0  # the drafter's confidence floor
    tree: str | None = None  # BRANCHxNODES of a draft tree of depth k (None = a chain)

    def summary_fields(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_draft_tokens": self.k,
            "lookup_first": self.lookup,
            "draft_stop_below": self.stop_below,
            "draft_tree": self.tree,
        }


def _main_path(config: BenchConfig, k: int | None = None) -> _Path:
    """The configured method at K (default: ``num_draft_tokens``), lookup and floor included."""
    k = k or config.num_draft_tokens
    n = config.lookup_first
    return _Path(config.method, k, max(k, n), n, config.draft_stop_below, config.draft_tree)


def _extra_specs(config: BenchConfig) -> dict[str, _Path]:
    """The extra paths of ``--sweep-k``, ``--sweep-stop-below``, ``--sweep-lookup``,
    ``--sweep-tree``, ``--lookup-first`` (the drafter alone, ``"drafter"``), ``--draft-tree``
    (the chain, ``"chain"``; with both, also the chain alone, ``"drafter chain"``) and
    ``--with-ngram``."""
    main = _main_path(config)
    specs = {f"k={k}": _main_path(config, k) for k in config.sweep}
    specs.update({f"stop<{f:g}": replace(main, stop_below=f) for f in config.stop_floors})
    specs.update(
        {f"lookup={n}": replace(main, lookup=n, allowed=max(main.k, n)) for n in config.lookups}
    )
    specs.update({f"tree={t}": replace(main, tree=t) for t in config.trees})
    if config.lookup_first:
        specs["drafter"] = replace(main, lookup=0, allowed=main.k)
    if config.draft_tree:
        specs["chain"] = replace(main, tree=None)
        if config.lookup_first:
            specs["drafter chain"] = replace(main, tree=None, lookup=0, allowed=main.k)
    if config.with_ngram:
        k = max(config.num_draft_tokens, config.lookup_first)
        specs["ngram"] = _Path("ngram", k, k)
    return specs


def _new_proposer(bench: _Bench, path: _Path) -> Proposer | None:
    """A fresh proposer for one request (proposers hold per-request state)."""
    if path.method in DRAFTER_METHODS:
        assert bench.drafter is not None
        tree = DraftTree.parse(path.tree) if path.tree else None
        drafter = bench.drafter.proposer(
            weights=bench.config.draft_weights, stop_below=path.stop_below, tree=tree
        )
        if path.lookup:
            return LookupFirstProposer(drafter, lookup_tokens=path.lookup, drafter_tokens=path.k)
        return drafter
    if path.method == "ngram":
        return NgramProposer()
    return None


def _sampling(config: BenchConfig, index: int, max_new_tokens: int) -> SamplingParams:
    seed = config.seed + index if config.temperature > 0 else None
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=config.temperature, seed=seed)


def _warm_up(bench: _Bench) -> None:
    """One untimed generation per path, so lazy initialisation is not timed."""
    _, ids, _ = bench.prompts[0]
    params = _sampling(bench.config, 0, min(WARMUP_TOKENS, bench.config.max_new_tokens))
    logger.info("warm-up (untimed)")
    _generate(bench, ids, params, None)
    _generate(bench, ids, params, _main_path(bench.config))
    if bench.config.peers:
        _hf_generate(bench.target, ids, params.max_new_tokens, prompt_lookup=False)
        _hf_generate(bench.target, ids, params.max_new_tokens, prompt_lookup=True)


def _generate(
    bench: _Bench, ids: list[int], params: SamplingParams, path: _Path | None
) -> GenerationResult:
    """One decode of ``path`` (None: plain decoding)."""
    return bench.engine.generate(
        ids,
        params,
        proposer=_new_proposer(bench, path) if path is not None else None,
        num_draft_tokens=path.allowed if path is not None else bench.config.num_draft_tokens,
        decode_text=False,
    )


def _extra_paths(
    bench: _Bench, ids: list[int], params: SamplingParams
) -> dict[str, Callable[[], GenerationResult]]:
    return {
        name: lambda path=path: _generate(bench, ids, params, path)  # type: ignore[misc]
        for name, path in _extra_specs(bench.config).items()
    }


def _measure_prompt(
    bench: _Bench, prompt_id: str, ids: list[int], index: int, category: str | None = None
) -> PromptRun:
    """Run every path ``repeats`` times, rotating their order each round so no path always runs
    first or last; keep each path's fastest run (the least disturbed by other load)."""
    config = bench.config
    params = _sampling(config, index, config.max_new_tokens)
    paths: dict[str, Callable[[], GenerationResult | PeerRun]] = {
        "baseline": lambda: _generate(bench, ids, params, None),
        "spec": lambda: _generate(bench, ids, params, _main_path(config)),
    }
    if config.peers:
        m = config.max_new_tokens
        paths["hf_generate"] = lambda: _hf_generate(bench.target, ids, m, prompt_lookup=False)
        paths["hf_prompt_lookup"] = lambda: _hf_generate(bench.target, ids, m, prompt_lookup=True)
    extra = _extra_paths(bench, ids, params)
    paths.update(extra)
    names = list(paths)
    best: dict[str, GenerationResult | PeerRun] = {}
    for round_index in range(config.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = paths[name]()
            if name not in best or _seconds(run) < _seconds(best[name]):
                best[name] = run
    baseline, spec = best["baseline"], best["spec"]
    hf_generate, hf_lookup = best.get("hf_generate"), best.get("hf_prompt_lookup")
    assert isinstance(baseline, GenerationResult) and isinstance(spec, GenerationResult)
    assert hf_generate is None or isinstance(hf_generate, PeerRun)
    assert hf_lookup is None or isinstance(hf_lookup, PeerRun)
    return PromptRun(
        prompt_id=prompt_id,
        prompt_tokens=len(ids),
        baseline=baseline,
        spec=spec,
        hf_generate=hf_generate,
        hf_prompt_lookup=hf_lookup,
        extra={name: _as_result(best[name]) for name in extra},
        category=category,
    )


def _as_result(run: GenerationResult | PeerRun) -> GenerationResult:
    assert isinstance(run, GenerationResult)
    return run


def _seconds(run: GenerationResult | PeerRun) -> float:
    if isinstance(run, PeerRun):
        return run.seconds
    return run.stats.prefill_s + run.stats.decode_s


def _hf_generation_config(
    target: TargetModel, max_new_tokens: int, *, prompt_lookup: bool
) -> GenerationConfig:
    """Greedy with our engine's stopping rule (the target's EOS ids), nothing else inherited."""
    eos = sorted(target.eos_token_ids)
    tokenizer_pad = getattr(target.tokenizer, "pad_token_id", None)
    pad = tokenizer_pad if tokenizer_pad is not None else (eos[0] if eos else None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad,
        prompt_lookup_num_tokens=HF_PROMPT_LOOKUP_TOKENS if prompt_lookup else None,
    )


@torch.inference_mode()
def _hf_generate(
    target: TargetModel, ids: list[int], max_new_tokens: int, *, prompt_lookup: bool
) -> PeerRun:
    """Time ``target.model.generate`` end to end (it cannot be split into prefill and decode)."""
    input_ids = torch.tensor([ids], device=target.device)  # [1, prompt]
    config = _hf_generation_config(target, max_new_tokens, prompt_lookup=prompt_lookup)
    synchronize(target.device)
    t0 = time.perf_counter()
    out = target.model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
    )  # [1, prompt + new]
    synchronize(target.device)
    seconds = time.perf_counter() - t0
    return PeerRun(token_ids=[int(t) for t in out[0, len(ids) :].tolist()], seconds=seconds)


# -- the report -------------------------------------------------------------------------------
def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _tau(results: list[GenerationResult]) -> float:
    """Tokens committed per verification cycle, over all of ``results``."""
    return _ratio(sum(r.stats.committed for r in results), sum(r.stats.cycles for r in results))


def _speedup(baseline: list[GenerationResult], results: list[GenerationResult]) -> float:
    """Decode-time speedup of ``results`` over the plain runs of the same prompts."""
    return _ratio(sum(r.stats.decode_s for r in baseline), sum(r.stats.decode_s for r in results))


def _tokens_per_s(results: list[GenerationResult]) -> float:
    """Generated tokens / (prefill + decode) seconds, summed over prompts."""
    tokens = sum(len(r.token_ids) for r in results)
    return _ratio(tokens, sum(r.stats.prefill_s + r.stats.decode_s for r in results))


def _peer_tokens_per_s(peers: list[PeerRun]) -> float:
    return _ratio(sum(len(p.token_ids) for p in peers), sum(p.seconds for p in peers))


def _position_counts(results: list[GenerationResult], k: int) -> tuple[list[int], list[int]]:
    """(accepted, proposed) per draft position 1..k, summed over prompts."""
    accepted, proposed = [0] * k, [0] * k
    for result in results:
        for j, (a, p) in enumerate(
            zip(result.stats.accepted_by_position, result.stats.proposed_by_position, strict=True)
        ):
            accepted[j] += a
            proposed[j] += p
    return accepted, proposed


def build_report(
    config: BenchConfig, runs: list[PromptRun], *, machine: dict[str, Any]
) -> dict[str, Any]:
    """The JSON report: the docs/design.md §6 keys first, then the context to interpret them."""
    spec = [r.spec for r in runs]
    baseline = [r.baseline for r in runs]
    k = _main_path(config).allowed if config.method != "none" else 0
    accepted, proposed = _position_counts(spec, k)
    report: dict[str, Any] = {
        "tau": _tau(spec),
        "speedup": _speedup(baseline, spec),
        "spec_tokens_per_s": _tokens_per_s(spec),
        "baseline_tokens_per_s": _tokens_per_s(baseline),
        "identical": sum(_identical(r) for r in runs),
        "num_prompts": len(runs),
        "acceptance_by_position": [_ratio(a, p) for a, p in zip(accepted, proposed, strict=True)],
    }
    if config.peers:
        report["hf_generate_tokens_per_s"] = _peer_tokens_per_s(
            [r.hf_generate for r in runs if r.hf_generate is not None]
        )
        report["hf_prompt_lookup_tokens_per_s"] = _peer_tokens_per_s(
            [r.hf_prompt_lookup for r in runs if r.hf_prompt_lookup is not None]
        )
        report["hf_identical"] = sum(_hf_identical(r) for r in runs)
    report.update(_context(config, machine, accepted=accepted, proposed=proposed))
    report["lookup_share"] = _lookup_share(spec)
    report["drafts_per_cycle"] = _drafts_per_cycle(spec)
    report.update(_tau_by_source(spec))
    report.update(_by_category(runs, lambda r: r.spec))
    if runs and runs[0].extra:
        specs = _extra_specs(config)
        report["extra_paths"] = {
            name: _path_summary(name, specs[name], runs) for name in runs[0].extra
        }
    report["per_prompt"] = [_prompt_entry(r) for r in runs]
    return report


def _path_summary(name: str, path: _Path, runs: list[PromptRun]) -> dict[str, Any]:
    """tau, decode speedup over the same run's plain baseline, tokens/s, identical count and
    acceptance by position of one extra path (``k=3``, ``ngram``, ...)."""
    results = [r.extra[name] for r in runs]
    baseline = [r.baseline for r in runs]
    accepted, proposed = _position_counts(results, path.allowed)
    return {
        **path.summary_fields(),
        "drafts_per_cycle": _drafts_per_cycle(results),
        "lookup_share": _lookup_share(results),
        **_tau_by_source(results),
        "tau": _tau(results),
        "speedup": _speedup(baseline, results),
        "tokens_per_s": _tokens_per_s(results),
        "identical": sum(r.extra[name].token_ids == r.baseline.token_ids for r in runs),
        "acceptance_by_position": [_ratio(a, p) for a, p in zip(accepted, proposed, strict=True)],
        **_by_category(runs, lambda r: r.extra[name]),
    }


def _by_category(
    runs: list[PromptRun], path: Callable[[PromptRun], GenerationResult]
) -> dict[str, Any]:
    """``{"by_category": ...}``: tau, decode speedup over plain and identical count of one path
    per prompt category (prompts without one count as "other"), in first-seen order; ``{}``
    where no prompt has a category."""
    if not any(r.category for r in runs):
        return {}
    groups: dict[str, list[PromptRun]] = {}
    for run in runs:
        groups.setdefault(run.category or "other", []).append(run)
    summary = {}
    for category, group in groups.items():
        results = [path(r) for r in group]
        summary[category] = {
            "num_prompts": len(group),
            "tau": _tau(results),
            "speedup": _speedup([r.baseline for r in group], results),
            "identical": sum(
                p.token_ids == r.baseline.token_ids for p, r in zip(results, group, strict=True)
            ),
        }
    return {"by_category": summary}


def _drafts_per_cycle(results: list[GenerationResult]) -> float:
    """Draft tokens (tree nodes for a tree) per cycle that proposed any."""
    return _ratio(sum(r.stats.draft_tokens for r in results), sum(r.stats.drafts for r in results))


def _tau_by_source(results: list[GenerationResult]) -> dict[str, float]:
    """tau of the cycles the n-gram lookup drafted and of the others (``lookup_tau`` is 0
    without lookup cycles)."""
    cycles = sum(r.stats.cycles for r in results)
    committed = sum(r.stats.committed for r in results)
    lookup_cycles = sum(r.stats.lookup_cycles for r in results)
    lookup_committed = sum(r.stats.lookup_committed for r in results)
    return {
        "lookup_tau": _ratio(lookup_committed, lookup_cycles),
        "drafter_tau": _ratio(committed - lookup_committed, cycles - lookup_cycles),
    }


def _lookup_share(results: list[GenerationResult]) -> float:
    """The share of cycles whose drafts came from n-gram lookup (0 without lookup_first)."""
    return _ratio(sum(r.stats.lookup_cycles for r in results), sum(r.stats.cycles for r in results))


def _identical(run: PromptRun) -> bool:
    return run.spec.token_ids == run.baseline.token_ids


def _hf_identical(run: PromptRun) -> bool:
    return run.hf_generate is not None and run.hf_generate.token_ids == run.baseline.token_ids


def _context(
    config: BenchConfig, machine: dict[str, Any], *, accepted: list[int], proposed: list[int]
) -> dict[str, Any]:
    return {
        "method": config.method,
        "num_draft_tokens": config.num_draft_tokens,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "greedy": config.temperature == 0,
        "target": config.target,
        "drafter": config.drafter_ref,
        "prompts": config.prompts or "mt_bench",
        "seed": config.seed,
        "dtype": config.dtype,
        "peers": config.peers,
        "repeats": config.repeats,
        "step": config.step,
        "kernel": config.kernel,
        "draft_weights": config.draft_weights if config.method in DRAFTER_METHODS else None,
        "lookup_first": config.lookup_first,
        "draft_stop_below": config.draft_stop_below,
        "draft_tree": config.draft_tree,
        "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS if config.peers else None,
        "accepted_by_position": accepted,
        "proposed_by_position": proposed,
        "machine": machine,
    }


def _result_entry(result: GenerationResult) -> dict[str, Any]:
    stats = result.stats
    return {
        "tokens": len(result.token_ids),
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "cycles": stats.cycles,
        "committed": stats.committed,
        "tau": stats.tau,
        "finish_reason": result.finish_reason,
    }


def _prompt_entry(run: PromptRun) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": run.prompt_id,
        "category": run.category,
        "prompt_tokens": run.prompt_tokens,
        "baseline": _result_entry(run.baseline),
        "spec": _result_entry(run.spec),
        "identical": _identical(run),
    }
    peers = {"hf_generate": run.hf_generate, "hf_prompt_lookup": run.hf_prompt_lookup}
    for name, peer in peers.items():
        if peer is not None:
            entry[name] = {"tokens": len(peer.token_ids), "seconds": peer.seconds}
    if run.hf_generate is not None:
        entry["hf_identical"] = _hf_identical(run)
    return entry


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def format_summary(report: dict[str, Any]) -> str:
    """A short human-readable table of the report."""
    n = report["num_prompts"]
    method = report["method"]
    method += lookup_label(report)
    rows = [("baseline (ours, plain)", report["baseline_tokens_per_s"])]
    rows.append((f"speculative (ours, {method})", report["spec_tokens_per_s"]))
    if report.get("peers"):
        rows.append(("HF generate (greedy)", report["hf_generate_tokens_per_s"]))
        lookup = f"HF prompt lookup ({report['hf_prompt_lookup_num_tokens']})"
        rows.append((lookup, report["hf_prompt_lookup_tokens_per_s"]))
    acceptance = ", ".join(f"{a:.2f}" for a in report["acceptance_by_position"]) or "-"
    lines = [
        f"target {report['target']} | method {method} | K={report['num_draft_tokens']} | "
        f"{n} prompts | max {report['max_new_tokens']} new tokens | T={report['temperature']}",
        f"{'path':<32}{'tokens/s':>10}",
        *(f"{name:<32}{value:>10.1f}" for name, value in rows),
        f"tau {report['tau']:.2f} | speedup (decode) {report['speedup']:.2f}x | "
        f"identical {report['identical']}/{n}"
        + (f" | {_lookup_note(report)[:-3]}" if report.get("lookup_share") else "")
        + (f" | HF identical {report['hf_identical']}/{n}" if report.get("peers") else ""),
        f"acceptance by position: [{acceptance}]",
    ]
    for category, row in report.get("by_category", {}).items():
        lines.append(
            f"  {category} ({row['num_prompts']}): tau {row['tau']:.2f} | "
            f"speedup {row['speedup']:.2f}x | identical {row['identical']}/{row['num_prompts']}"
        )
    for path in report.get("extra_paths", {}).values():
        accept = ", ".join(f"{a:.2f}" for a in path["acceptance_by_position"])
        lines.append(
            f"{path['method']}{lookup_label(path)} K={path['num_draft_tokens']}: "
            f"tau {path['tau']:.2f} | "
            f"speedup {path['speedup']:.2f}x | "
            f"{path['tokens_per_s']:.1f} tok/s | identical {path['identical']}/{n} | "
            + _lookup_note(path)
            + f"drafts/cycle {path.get('drafts_per_cycle', 0.0):.2f} | "
            f"acceptance [{accept}]"
        )
    return "\n".join(lines) + "\n"


def lookup_label(path: dict[str, Any]) -> str:
    """What a path added to its method: " + lookup N" (n-gram lookup first), " stop<P" (a
    confidence floor) and " tree BxN" (a draft tree); "" for none."""
    lookup, floor = path.get("lookup_first", 0), path.get("draft_stop_below", 0.0)
    tree = path.get("draft_tree")
    return (
        (f" + lookup {lookup}" if lookup else "")
        + (f" stop<{floor:g}" if floor else "")
        + (f" tree {tree}" if tree else "")
    )


def _lookup_note(path: dict[str, Any]) -> str:
    """The lookup's share of cycles and tau by source (lookup / drafter cycles), if any."""
    share = path.get("lookup_share", 0.0)
    if not share:
        return ""
    taus = f"{path.get('lookup_tau', 0.0):.2f} / {path.get('drafter_tau', 0.0):.2f}"
    return f"lookup {share:.0%} of cycles (tau lookup / drafter {taus}) | "
