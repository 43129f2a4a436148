"""Correctness check 1 (docs/draft_opd.md): greedy speculative output == plain greedy output."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.proposers import LookupFirstProposer, NgramProposer
from draftopd.speculative.sampling import SamplingParams
from tests.unit.speculative.helpers import NoisyOracleProposer

PROMPTS = [
    "Speculative decoding lets a small draft model",
    "Beautiful is better than ugly.",
    "def add(a, b):",
    "x",  # a one-token prompt: the first cycle has no target features to draft from
]


def _ids(target: Any, text: str) -> list[int]:
    return list(target.tokenizer(text, add_special_tokens=False)["input_ids"])


def _proposers(target: Any, drafter: Any, dflash: Any) -> dict[str, Any]:
    return {
        "eagle3": lambda: drafter.proposer(),
        "dflash": lambda: dflash.proposer(),
        "ngram": lambda: NgramProposer(),
        "oracle": lambda: NoisyOracleProposer(target, noise=0.3),
        # lookup first: n-gram runs up to K tokens, the drafter up to K - 2 elsewhere
        "lookup+eagle3": lambda k: LookupFirstProposer(
            drafter.proposer(), lookup_tokens=k, drafter_tokens=max(1, k - 2)
        ),
        "lookup+dflash": lambda k: LookupFirstProposer(
            dflash.proposer(), lookup_tokens=k, drafter_tokens=max(1, k - 2)
        ),
    }


@pytest.mark.parametrize(
    "method", ["eagle3", "dflash", "ngram", "oracle", "lookup+eagle3", "lookup+dflash"]
)
@pytest.mark.parametrize("k", [1, 4, 7])
def test_speculative_greedy_equals_plain_greedy(
    tiny_target: Any, tiny_drafter: Any, tiny_dflash: Any, method: str, k: int
) -> None:
    engine = DecodeEngine(tiny_target, num_draft_tokens=k)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    make = _proposers(tiny_target, tiny_drafter, tiny_dflash)[method]
    if method.startswith("lookup+"):
        make = functools.partial(make, k)
    for text in PROMPTS:
        ids = _ids(tiny_target, text)
        plain = engine.generate(ids, params)
        spec = engine.generate(ids, params, proposer=make())
        assert spec.token_ids == plain.token_ids, (method, k, text)
        assert len(spec.token_ids) == 48
        assert spec.stats.committed == 48  # drafts are capped so no cycle overshoots
        assert 1.0 <= spec.stats.tau <= k + 1


def test_oracle_and_ngram_really_accept(tiny_target: Any) -> None:
    """Guard against a vacuous equality: the proposers above do get drafts accepted and rejected."""
    engine = DecodeEngine(tiny_target, num_draft_tokens=4)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    ids = _ids(tiny_target, PROMPTS[0])
    oracle = engine.generate(ids, params, proposer=NoisyOracleProposer(tiny_target, noise=0.3))
    ngram = engine.generate(ids, params, proposer=NgramProposer())
    assert oracle.stats.tau > 1.5
    assert 0 < oracle.stats.accepted_tokens < oracle.stats.draft_tokens
    assert ngram.stats.accepted_tokens > 0


def test_plain_greedy_equals_hf_generate(tiny_target: Any, tiny_drafter: Any) -> None:
    engine = DecodeEngine(tiny_target, num_draft_tokens=4)
    for text in PROMPTS:
        ids = _ids(tiny_target, text)
        x = torch.tensor([ids])
        hf = tiny_target.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
        )[0, len(ids) :].tolist()
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        assert engine.generate(ids, params).token_ids == hf
        spec = engine.generate(ids, params, proposer=tiny_drafter.proposer())
        assert spec.token_ids == hf


def test_stops_at_max_tokens_eos_and_stop_string(tiny_target: Any) -> None:
    engine = DecodeEngine(tiny_target, num_draft_tokens=4)
    ids = _ids(tiny_target, PROMPTS[0])
    full = engine.generate(ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 30

    # EOS: pretend the 6th generated token is EOS; the output ends right after it, even when the
    # cycle that committed it also committed more tokens.
    eos = full.token_ids[5]
    first = full.token_ids.index(eos)
    target_eos = tiny_target.eos_token_ids
    try:
        tiny_target.config.eos_token_id = eos
        tiny_target.model.generation_config.eos_token_id = eos
        for proposer in (None, NgramProposer(), NoisyOracleProposer(tiny_target, noise=0.0)):
            out = engine.generate(ids, SamplingParams(max_new_tokens=30), proposer=proposer)
            assert out.finish_reason == "stop"
            assert out.token_ids == full.token_ids[: first + 1]
    finally:
        (old,) = target_eos
        tiny_target.config.eos_token_id = old
        tiny_target.model.generation_config.eos_token_id = old

    # stop string: the text is cut before it; tokens end where it became visible
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    for proposer in (None, NoisyOracleProposer(tiny_target, noise=0.0)):
        out = engine.generate(
            ids, SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True), proposer=proposer
        )
        assert out.finish_reason == "stop"
        assert out.text == full.text[: full.text.index(stop)]
        assert stop in tiny_target.tokenizer.decode(out.token_ids)
        assert stop not in tiny_target.tokenizer.decode(out.token_ids[:-1])


def test_streaming_deltas_concatenate_to_result(tiny_target: Any) -> None:
    engine = DecodeEngine(tiny_target, num_draft_tokens=4)
    ids = _ids(tiny_target, PROMPTS[1])
    run = engine.start(
        ids,
        SamplingParams(max_new_tokens=32, ignore_eos=True, stop=("zzz",)),
        proposer=NoisyOracleProposer(tiny_target),
    )
    deltas = list(run)
    assert [t for d in deltas for t in d.token_ids] == run.result.token_ids
    assert "".join(d.text for d in deltas) == run.result.text
    assert len(deltas) >= 2
