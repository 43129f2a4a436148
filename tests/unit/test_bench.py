"""draftopd.bench on a tiny random target: report keys, losslessness, the report arithmetic."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from draftopd.bench import (
    PEER_KEYS,
    REPORT_KEYS,
    BenchConfig,
    PeerRun,
    PromptRun,
    build_report,
    format_summary,
    parse_drafter_ref,
    run_bench,
    write_report,
)
from draftopd.models.checkpoint import random_drafter_for, save_drafter
from draftopd.models.target import load_target
from draftopd.models.tiny import build_tiny_target
from draftopd.speculative.engine import DecodeStats, GenerationResult

K = 3
MAX_NEW = 12
PROMPT_ROWS: list[dict[str, Any]] = [
    {"prompt": "The quick brown fox jumps over the"},
    {"question_id": 81, "turns": ["Write a poem about the sea.", "Now shorter."]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "target")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPT_ROWS), encoding="utf-8")
    return path


def bench_config(tiny_dir: Path, prompts_file: Path, **overrides: Any) -> BenchConfig:
    values: dict[str, Any] = {
        "prompts": str(prompts_file),
        "target": str(tiny_dir),
        "max_new_tokens": MAX_NEW,
        "num_draft_tokens": K,
        "device": "cpu",
        "progress": False,
    }
    values.update(overrides)
    return BenchConfig(**values)


def assert_report_sane(report: dict[str, Any], *, num_prompts: int, k: int) -> None:
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["num_prompts"] == num_prompts
    assert report["identical"] == num_prompts  # greedy speculative decoding is lossless
    assert 1.0 <= report["tau"] <= k + 1
    assert len(report["acceptance_by_position"]) == k
    assert all(0.0 <= a <= 1.0 for a in report["acceptance_by_position"])
    assert report["speedup"] > 0
    assert report["spec_tokens_per_s"] > 0
    assert report["baseline_tokens_per_s"] > 0
    assert len(report["per_prompt"]) == num_prompts
    assert all(entry["identical"] for entry in report["per_prompt"])
    assert {"platform", "cpu_count", "torch", "device"} <= set(report["machine"])
    json.dumps(report)  # serialisable as it is


@pytest.mark.parametrize("method", ["ngram", "eagle3", "dflash", "none"])
def test_run_bench_with_peers(tiny_dir: Path, prompts_file: Path, method: str) -> None:
    report = run_bench(bench_config(tiny_dir, prompts_file, method=method, peers=True))
    k = 0 if method == "none" else K
    assert_report_sane(report, num_prompts=len(PROMPT_ROWS), k=k)
    for key in PEER_KEYS:
        assert report[key] > 0
    assert 0 <= report["hf_identical"] <= len(PROMPT_ROWS)
    assert report["method"] == method
    assert report["drafter"] == ("random:0" if method in ("eagle3", "dflash") else None)
    assert report["num_draft_tokens"] == K
    assert report["max_new_tokens"] == MAX_NEW
    spec = [entry["spec"] for entry in report["per_prompt"]]
    total_committed = sum(s["committed"] for s in spec)
    assert report["tau"] == pytest.approx(total_committed / sum(s["cycles"] for s in spec))
    for entry in report["per_prompt"]:
        assert entry["baseline"]["cycles"] == entry["baseline"]["tokens"]  # one token per step
        assert 1 <= entry["hf_generate"]["tokens"] <= MAX_NEW
        assert 1 <= entry["hf_prompt_lookup"]["tokens"] <= MAX_NEW
    if method == "none":
        assert report["tau"] == 1.0


def test_run_bench_without_peers_has_no_peer_keys(tiny_dir: Path, prompts_file: Path) -> None:
    report = run_bench(bench_config(tiny_dir, prompts_file, method="ngram", limit=1))
    assert_report_sane(report, num_prompts=1, k=K)
    assert not set(PEER_KEYS) & set(report)
    assert "hf_generate" not in report["per_prompt"][0]


def test_run_bench_loads_a_drafter_checkpoint(
    tiny_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    target = load_target(str(tiny_dir))
    checkpoint = save_drafter(random_drafter_for(target, seed=3), tmp_path / "drafter")
    config = bench_config(tiny_dir, prompts_file, method="eagle3", drafter=str(checkpoint))
    report = run_bench(config)
    assert_report_sane(report, num_prompts=len(PROMPT_ROWS), k=K)
    assert report["drafter"] == str(checkpoint)


def test_run_bench_sampling_reports_not_greedy(tiny_dir: Path, prompts_file: Path) -> None:
    config = bench_config(tiny_dir, prompts_file, method="ngram", temperature=0.8, limit=2)
    report = run_bench(config)
    assert report["greedy"] is False
    assert report["temperature"] == 0.8
    assert 1.0 <= report["tau"] <= K + 1
    assert 0 <= report["identical"] <= 2


def test_parse_drafter_ref() -> None:
    assert parse_drafter_ref("random:7").seed == 7
    assert parse_drafter_ref("random:7").path is None
    assert parse_drafter_ref("random:7").draft_vocab_size is None
    sized = parse_drafter_ref("random:7:8000")
    assert (sized.seed, sized.draft_vocab_size, sized.path) == (7, 8000, None)


def test_parse_drafter_ref_directory(tmp_path: Path) -> None:
    assert parse_drafter_ref(str(tmp_path)).path == tmp_path


@pytest.mark.parametrize(
    "ref", ["bogus", "random:", "random:x", "production", "drafter@v3", "random:1:x", "random:1:0"]
)
def test_parse_drafter_ref_rejects(ref: str) -> None:
    with pytest.raises(ValueError, match="random:SEED"):
        parse_drafter_ref(ref)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "medusa"}, "method 'medusa' not supported"),
        ({"method": "ngram", "drafter": "random:1"}, "only to methods"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"limit": 0}, "limit"),
        ({"threads": 0}, "threads"),
        ({"drafter": "bogus"}, "neither a checkpoint directory"),
    ],
)
def test_bench_config_rejects(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**overrides)


def test_bench_config_default_drafter() -> None:
    assert BenchConfig().drafter_ref == "random:0"
    assert BenchConfig(method="ngram").drafter_ref is None


# -- report arithmetic on hand-made results ---------------------------------------------------
def fake_result(
    tokens: int,
    *,
    prefill_s: float,
    decode_s: float,
    cycles: int,
    accepted: list[int],
    proposed: list[int],
) -> GenerationResult:
    stats = DecodeStats(
        cycles=cycles,
        committed=tokens,
        accepted_by_position=accepted,
        proposed_by_position=proposed,
        prefill_s=prefill_s,
        decode_s=decode_s,
    )
    ids = list(range(tokens))
    return GenerationResult(
        prompt_ids=[1],
        token_ids=ids,
        text="",
        finish_reason="length",
        stats=stats,
        committed_ids=ids,
        cycles=None,
    )


def test_build_report_arithmetic() -> None:
    base = [
        fake_result(10, prefill_s=1.0, decode_s=4.0, cycles=10, accepted=[], proposed=[]),
        fake_result(6, prefill_s=1.0, decode_s=2.0, cycles=6, accepted=[], proposed=[]),
    ]
    spec = [
        fake_result(10, prefill_s=1.0, decode_s=1.0, cycles=4, accepted=[3, 2], proposed=[4, 4]),
        fake_result(6, prefill_s=0.5, decode_s=0.5, cycles=4, accepted=[1], proposed=[4]),
    ]
    spec[1] = replace(spec[1], token_ids=[9, 9, 9, 9, 9, 9])  # differs: not identical
    runs = [
        PromptRun(
            prompt_id=str(i),
            prompt_tokens=5,
            baseline=b,
            spec=s,
            hf_generate=PeerRun(token_ids=b.token_ids, seconds=2.0),
            hf_prompt_lookup=PeerRun(token_ids=[1, 2], seconds=0.5),
        )
        for i, (b, s) in enumerate(zip(base, spec, strict=True))
    ]
    config = BenchConfig(method="ngram", num_draft_tokens=2, peers=True)
    report = build_report(config, runs, machine={})
    assert report["tau"] == pytest.approx(16 / 8)
    assert report["speedup"] == pytest.approx(6.0 / 1.5)
    assert report["baseline_tokens_per_s"] == pytest.approx(16 / 8.0)
    assert report["spec_tokens_per_s"] == pytest.approx(16 / 3.0)
    assert report["acceptance_by_position"] == pytest.approx([4 / 8, 2 / 4])
    assert report["accepted_by_position"] == [4, 2]
    assert report["identical"] == 1
    assert report["hf_identical"] == 2
    assert report["hf_generate_tokens_per_s"] == pytest.approx(16 / 4.0)
    assert report["hf_prompt_lookup_tokens_per_s"] == pytest.approx(4 / 1.0)
    assert [e["identical"] for e in report["per_prompt"]] == [True, False]
    assert "by_category" not in report  # the prompts carry no category


def test_report_splits_tau_and_speedup_by_category() -> None:
    def run(category: str | None, decode_s: float, cycles: int, same: bool) -> PromptRun:
        base = fake_result(8, prefill_s=1.0, decode_s=4.0, cycles=8, accepted=[], proposed=[])
        spec = fake_result(8, prefill_s=1.0, decode_s=decode_s, cycles=cycles, accepted=[1],
                           proposed=[2])  # fmt: skip
        if not same:
            spec = replace(spec, token_ids=[7] * 8)
        return PromptRun(str(cycles), 5, base, spec, None, None, {"ngram": spec}, category)

    runs = [run("code", 1.0, 2, True), run("prose", 4.0, 8, True), run("code", 3.0, 6, False)]
    runs.append(run(None, 2.0, 4, True))
    config = BenchConfig(method="ngram", num_draft_tokens=2, with_ngram=True)
    report = build_report(config, runs, machine={})
    by = report["by_category"]
    assert list(by) == ["code", "prose", "other"]
    assert by["code"] == {"num_prompts": 2, "tau": pytest.approx(16 / 8),
                          "speedup": pytest.approx(8 / 4), "identical": 1}  # fmt: skip
    assert by["prose"]["tau"] == pytest.approx(1.0) and by["prose"]["speedup"] == pytest.approx(1)
    assert by["other"]["tau"] == pytest.approx(2.0) and by["other"]["identical"] == 1
    assert [e["category"] for e in report["per_prompt"]] == ["code", "prose", "code", None]
    assert report["extra_paths"]["ngram"]["by_category"] == by
    assert "  code (2): tau 2.00 | speedup 2.00x | identical 1/2" in format_summary(report)


def test_format_summary_and_write_report(tmp_path: Path) -> None:
    report = {
        "tau": 2.5,
        "speedup": 1.75,
        "spec_tokens_per_s": 70.0,
        "baseline_tokens_per_s": 40.0,
        "identical": 9,
        "num_prompts": 10,
        "acceptance_by_position": [0.8, 0.5],
        "hf_generate_tokens_per_s": 38.0,
        "hf_prompt_lookup_tokens_per_s": 45.0,
        "hf_identical": 10,
        "hf_prompt_lookup_num_tokens": 10,
        "peers": True,
        "method": "eagle3",
        "num_draft_tokens": 2,
        "max_new_tokens": 128,
        "temperature": 0.0,
        "target": "smollm2",
    }
    text = format_summary(report)
    assert "tau 2.50" in text
    assert "speedup (decode) 1.75x" in text
    assert "identical 9/10" in text
    assert "[0.80, 0.50]" in text
    assert "HF prompt lookup (10)" in text
    out = write_report(report, tmp_path / "sub" / "bench.json")
    assert json.loads(out.read_text()) == report


def test_repeats_keep_the_fastest_run_of_every_path(tmp_path: Path, tiny_target_dir: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Beautiful is better than ugly.", "category": "zen"}\n')
    config = BenchConfig(
        prompts=str(prompts),
        target=str(tiny_target_dir),
        method="ngram",
        max_new_tokens=12,
        peers=True,
        repeats=3,
        progress=False,
    )
    report = run_bench(config)
    assert report["repeats"] == 3 and report["identical"] == 1 and report["num_prompts"] == 1
    assert report["by_category"]["zen"]["num_prompts"] == 1  # the file's category reaches it
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(repeats=0)


def test_sweep_k_and_ngram_run_beside_the_method_in_the_same_run(
    tiny_dir: Path, prompts_file: Path
) -> None:
    config = bench_config(
        tiny_dir, prompts_file, method="eagle3", drafter="random:1:50", sweep_k="3,2",
        with_ngram=True, limit=2,
    )  # fmt: skip
    report = run_bench(config)
    assert_report_sane(report, num_prompts=2, k=K)
    extra = report["extra_paths"]
    assert list(extra) == ["k=2", "k=3", "ngram"]
    for name, k in (("k=2", 2), ("k=3", 3), ("ngram", K)):
        path = extra[name]
        assert path["num_draft_tokens"] == k and len(path["acceptance_by_position"]) == k
        assert path["identical"] == 2  # lossless at every K
        assert path["speedup"] > 0 and 1.0 <= path["tau"] <= k + 1
    assert extra["ngram"]["method"] == "ngram" and extra["k=2"]["method"] == "eagle3"
    text = format_summary(report)
    assert "eagle3 K=2: tau" in text and f"ngram K={K}: tau" in text
    with pytest.raises(ValueError, match="sweep_k"):
        bench_config(tiny_dir, prompts_file, sweep_k="2,x")


def test_a_checkpoint_of_another_family_is_refused(
    tiny_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    target = load_target(str(tiny_dir))
    checkpoint = save_drafter(
        random_drafter_for(target, seed=3, architecture="dflash"), tmp_path / "dflash"
    )
    with pytest.raises(ValueError, match="holds a dflash drafter, not eagle3"):
        run_bench(bench_config(tiny_dir, prompts_file, method="eagle3", drafter=str(checkpoint)))
    report = run_bench(
        bench_config(tiny_dir, prompts_file, method="dflash", drafter=str(checkpoint), limit=1)
    )
    assert_report_sane(report, num_prompts=1, k=K)


def test_lookup_first_runs_beside_the_drafter_alone(tiny_dir: Path, prompts_file: Path) -> None:
    config = bench_config(
        tiny_dir, prompts_file, method="eagle3", drafter="random:1:50", lookup_first=5,
        sweep_k="2", sweep_lookup="4", with_ngram=True, limit=2,
    )  # fmt: skip
    report = run_bench(config)
    assert_report_sane(report, num_prompts=2, k=5)  # the spec path allows max(K, N) drafts
    assert report["lookup_first"] == 5
    extra = report["extra_paths"]
    assert list(extra) == ["k=2", "lookup=4", "drafter", "ngram"]
    assert extra["lookup=4"]["lookup_first"] == 4 and extra["lookup=4"]["num_draft_tokens"] == K
    assert len(extra["lookup=4"]["acceptance_by_position"]) == 4 and extra["lookup=4"]["tau"] > 1
    assert extra["drafter"]["lookup_first"] == 0 and extra["drafter"]["num_draft_tokens"] == K
    assert len(extra["drafter"]["acceptance_by_position"]) == K
    assert extra["k=2"]["lookup_first"] == 5 and len(extra["k=2"]["acceptance_by_position"]) == 5
    assert extra["ngram"]["num_draft_tokens"] == 5
    assert extra["drafter"]["lookup_share"] == 0 and 0 < extra["k=2"]["lookup_share"] < 1
    assert 0 < report["lookup_share"] < 1
    # tau by source: the cycle-weighted mix of the two is the path's tau
    for path in (report, extra["k=2"]):
        share, lookup, drafter = path["lookup_share"], path["lookup_tau"], path["drafter_tau"]
        assert lookup > drafter >= 1  # the random drafter is rarely right, the lookup often
        assert share * lookup + (1 - share) * drafter == pytest.approx(path["tau"])
    assert extra["drafter"]["lookup_tau"] == 0 and extra["drafter"]["drafter_tau"] == (
        pytest.approx(extra["drafter"]["tau"])
    )
    assert all(path["identical"] == 2 for path in extra.values())
    text = format_summary(report)
    assert "method eagle3 + lookup 5" in text and "eagle3 + lookup 5 K=2: tau" in text
    assert "(tau lookup / drafter " in text
    assert f"eagle3 K={K}: tau" in text
    with pytest.raises(ValueError, match="combines n-gram lookup with a drafter"):
        bench_config(tiny_dir, prompts_file, method="ngram", lookup_first=4)
    with pytest.raises(ValueError, match="sweep_lookup"):
        bench_config(tiny_dir, prompts_file, sweep_lookup="0")


def test_confidence_floors_run_side_by_side(tiny_dir: Path, prompts_file: Path) -> None:
    config = bench_config(
        tiny_dir, prompts_file, method="eagle3", drafter="random:1:50", sweep_stop_below="0,1",
        limit=2,
    )  # fmt: skip
    report = run_bench(config)
    assert_report_sane(report, num_prompts=2, k=K)
    extra = report["extra_paths"]
    assert list(extra) == ["stop<0", "stop<1"]
    assert extra["stop<1"]["draft_stop_below"] == 1.0 and extra["stop<0"]["draft_stop_below"] == 0
    assert extra["stop<1"]["drafts_per_cycle"] == 1.0  # a floor of 1 keeps only the first draft
    assert extra["stop<0"]["drafts_per_cycle"] > 1.0
    assert all(path["identical"] == 2 for path in extra.values())
    assert "eagle3 stop<1 K=3: tau" in format_summary(report)
    for bad in ({"sweep_stop_below": "0.2,x"}, {"draft_stop_below": 1.5}):
        with pytest.raises(ValueError, match="stop_below"):
            bench_config(tiny_dir, prompts_file, **bad)
    with pytest.raises(ValueError, match="needs a drafter method"):
        bench_config(tiny_dir, prompts_file, method="ngram", draft_stop_below=0.3)


def test_draft_trees_run_beside_the_chain(tiny_dir: Path, prompts_file: Path) -> None:
    config = bench_config(
        tiny_dir, prompts_file, method="eagle3", drafter="random:1:50", draft_tree="3x8",
        sweep_tree="2x4", lookup_first=5, limit=2,
    )  # fmt: skip
    report = run_bench(config)
    assert_report_sane(report, num_prompts=2, k=5)
    assert report["draft_tree"] == "3x8" and 1 < report["drafts_per_cycle"] <= 8
    extra = report["extra_paths"]
    assert list(extra) == ["tree=2x4", "drafter", "chain", "drafter chain"]
    alone = extra["drafter chain"]
    assert alone["draft_tree"] is None and alone["lookup_first"] == 0 and alone["lookup_share"] == 0
    assert extra["tree=2x4"]["draft_tree"] == "2x4" and extra["chain"]["draft_tree"] is None
    assert extra["chain"]["lookup_first"] == 5 and extra["drafter"]["draft_tree"] == "3x8"
    # a tree cycle drafts up to its node count; the chain at most K
    assert 3 < extra["drafter"]["drafts_per_cycle"] <= 8
    assert extra["chain"]["drafts_per_cycle"] <= 5
    assert all(path["identical"] == 2 for path in extra.values())
    text = format_summary(report)
    assert "method eagle3 + lookup 5 tree 3x8" in text and "eagle3 + lookup 5 tree 2x4" in text
    for bad in ({"draft_tree": "3,8"}, {"sweep_tree": "2x4,0x3"}):
        with pytest.raises(ValueError, match="BRANCHxNODES"):
            bench_config(tiny_dir, prompts_file, method="eagle3", **bad)
    with pytest.raises(ValueError, match="need method 'eagle3'"):
        bench_config(tiny_dir, prompts_file, method="dflash", draft_tree="3x8")
    with pytest.raises(ValueError, match="do not combine"):
        bench_config(tiny_dir, prompts_file, draft_tree="3x8", draft_stop_below=0.3)
