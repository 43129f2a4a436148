"""Recorded cycles (docs/design.md §3) are complete and exact: Draft-OPD replays from them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from draftopd.speculative.engine import DecodeEngine, GenerationResult
from draftopd.speculative.proposers import NgramProposer
from draftopd.speculative.records import RolloutRecord, record_size_bound, stream_key
from draftopd.speculative.sampling import SamplingParams
from tests.unit.speculative.helpers import NoisyOracleProposer

PROMPT = "Speculative decoding lets a small draft model"
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.9, top_p=0.95, seed=7)


def _run(
    target: Any, drafters: dict[str, Any], method: str, params: SamplingParams
) -> GenerationResult:
    proposer: Any = {
        "eagle3": lambda: drafters["eagle3"].proposer(),
        "dflash": lambda: drafters["dflash"].proposer(),
        "ngram": NgramProposer,
        "oracle": lambda: NoisyOracleProposer(target, noise=0.35, seed=3),
    }[method]()
    ids = list(target.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    return DecodeEngine(target, num_draft_tokens=5).generate(
        ids, params, proposer=proposer, record=True
    )


CASES = [(m, p) for m in ("eagle3", "dflash", "ngram", "oracle") for p in ("greedy", "sampled")]


@pytest.fixture(scope="module")
def results(
    tiny_target: Any, tiny_drafter: Any, tiny_dflash: Any
) -> dict[tuple[str, str], GenerationResult]:
    params = {"greedy": GREEDY, "sampled": SAMPLED}
    drafters = {"eagle3": tiny_drafter, "dflash": tiny_dflash}
    return {(m, p): _run(tiny_target, drafters, m, params[p]) for m, p in CASES}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_each_cycle_commits_accepted_drafts_plus_one(results: Any, case: tuple[str, str]) -> None:
    cycles = results[case].cycles
    assert cycles
    for c in cycles:
        assert 0 <= c.accepted <= len(c.proposed) <= 5
        assert len(c.committed) == c.accepted + 1
        assert c.committed[: c.accepted] == c.proposed[: c.accepted]
        if c.accepted < len(c.proposed):
            # the correction token replaces the rejected draft (greedy: argmax differs; sampling:
            # the residual max(0, p - q) is zero at a rejected token)
            assert c.committed[-1] != c.proposed[c.accepted]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_committed_tokens_concatenate_to_response(results: Any, case: tuple[str, str]) -> None:
    result = results[case]
    joined = [t for c in result.cycles for t in c.committed]
    assert joined == result.committed_ids == result.token_ids
    assert sum(len(c.committed) for c in result.cycles) / len(result.cycles) == result.stats.tau


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_anchors(results: Any, case: tuple[str, str]) -> None:
    cycles = results[case].cycles
    assert cycles[0].anchor == -1  # drafting starts from the last prompt token
    done = 0
    for c in cycles:
        assert c.anchor == done - 1  # the last committed token: the previous cycle's bonus
        done += len(c.committed)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_rejected_teacher_logprobs_match_independent_forward(
    tiny_target: Any, results: Any, case: tuple[str, str]
) -> None:
    result = results[case]
    checked = 0
    for c in result.cycles:
        rejected = c.proposed[c.accepted :]
        assert len(c.rejected_teacher_logprobs) == len(rejected)
        prefix = result.prompt_ids + result.committed_ids[: c.anchor + 1]
        for j, (token, recorded) in enumerate(
            zip(rejected, c.rejected_teacher_logprobs, strict=True)
        ):
            ids = torch.tensor([prefix + c.proposed[: c.accepted + j]])
            logits = tiny_target.model(input_ids=ids).logits[0, -1]  # no cache, full recompute
            expected = torch.log_softmax(logits.float(), dim=-1)[token]
            torch.testing.assert_close(torch.tensor(recorded), expected, atol=1e-4, rtol=1e-4)
            checked += 1
    if case[0] == "oracle":
        assert checked > 5  # the oracle's corrupted drafts are rejected often


def test_records_cover_partial_acceptance(results: Any) -> None:
    accepted = {c.accepted for c in results[("oracle", "greedy")].cycles}
    assert 0 in accepted and max(accepted) >= 3 and len(accepted) >= 3


def test_record_roundtrip_through_stream_fields(results: Any) -> None:
    result = results[("oracle", "sampled")]
    record = RolloutRecord.from_result(
        result, SAMPLED, job_id="job-1", drafter_version="v3", target_model="tiny"
    )
    fields = record.to_fields()
    wire = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
    back = RolloutRecord.from_fields(wire)
    assert back.cycles[0] == result.cycles[0]
    assert back.response_ids == result.committed_ids and back.prompt_ids == result.prompt_ids
    assert back.sampling == {"temperature": 0.9, "top_p": 0.95, "top_k": 0, "seed": 7}
    for mine, theirs in zip(back.cycles, result.cycles, strict=True):
        assert replace(mine, rejected_teacher_logprobs=[]) == replace(
            theirs, rejected_teacher_logprobs=[]
        )
        torch.testing.assert_close(
            torch.tensor(mine.rejected_teacher_logprobs, dtype=torch.float64),
            torch.tensor(theirs.rejected_teacher_logprobs, dtype=torch.float64),
            atol=1e-5,
            rtol=1e-6,
        )
    assert stream_key("job-1") == "draftopd:rollouts:job-1"
    with pytest.raises(ValueError, match="schema_version"):
        RolloutRecord.from_fields({**wire, b"schema_version": b"99"})


def test_record_size_is_within_the_documented_bound(results: Any) -> None:
    for case, result in results.items():
        record = RolloutRecord.from_result(
            result, GREEDY, job_id="j", drafter_version="v", target_model="t"
        )
        size = len(record.to_fields()["data"])
        tokens = len(result.prompt_ids) + len(result.committed_ids)
        bound = record_size_bound(tokens, result.cycles)
        assert size <= bound, case
        assert size >= 0.5 * bound, case  # the bound is tight enough to plan capacity with
