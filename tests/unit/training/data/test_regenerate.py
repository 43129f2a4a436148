"""Target-regenerated SFT data: batched generation, shards, resume, collate, target features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from draftopd.models.target import TargetModel
from draftopd.prompts import Prompt, render_prompt
from draftopd.training.data.batches import collate, target_features
from draftopd.training.data.regenerate import Sample, iter_samples, read_manifest, regenerate

TEXTS = [
    "Write a poem about the sea.",
    "Hi",
    "Explain speculative decoding to a child, in three short sentences please.",
    "def add(a, b):",
    "Readability counts. Errors should never pass silently.",
    "Simple is better than complex.",
    "The quick brown fox",
    "Now is better than never. Flat is better than nested. Sparse is better than dense.",
    "What is 0123456789 + 1?",
    "Beautiful is better than ugly.",
]


def make_prompts(n: int = len(TEXTS)) -> list[Prompt]:
    return [
        Prompt(id=f"q{i}", messages=None, text=TEXTS[i % len(TEXTS)], source="prompt")
        for i in range(n)
    ]


def reference_greedy(target: TargetModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Unbatched greedy decoding without a cache: argmax of a full forward, stop after EOS."""
    ids = list(prompt_ids)
    response: list[int] = []
    for _ in range(max_new_tokens):
        token = int(target.forward(torch.tensor([ids])).logits[0, -1].argmax())
        response.append(token)
        ids.append(token)
        if token in target.eos_token_ids:
            break
    return response


def by_id(out_dir: Path) -> dict[str, Sample]:
    return {s.prompt_id: s for s in iter_samples(out_dir)}


class CountingGenerate:
    """Wraps ``model.generate`` and counts the batch rows it is asked to generate."""

    def __init__(self, generate: Any) -> None:
        self.generate, self.rows = generate, 0

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        self.rows += int(kwargs["input_ids"].shape[0])
        return self.generate(**kwargs)


class StopAfter:
    """An ``on_shard`` callback that simulates a crash after ``n`` committed shards."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, path: Path) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt(f"simulated interruption after {path.name}")


@pytest.mark.parametrize("engine", ["lean", "generate"])
def test_batched_greedy_equals_unbatched_greedy(
    tiny_target: TargetModel, tmp_path: Path, engine: str
) -> None:
    prompts = make_prompts()
    stats = regenerate(
        tiny_target, prompts, tmp_path, max_new_tokens=12, batch_size=4, progress=False,
        engine=engine,
    )  # fmt: skip
    assert read_manifest(tmp_path)["settings"]["engine"] == engine
    samples = by_id(tmp_path)
    assert stats.prompts == len(prompts) and stats.skipped == 0
    assert len({len(s.prompt_ids) for s in samples.values()}) > 4  # batches really were padded
    for prompt in prompts:
        sample = samples[prompt.id]
        assert list(sample.prompt_ids) == render_prompt(tiny_target.tokenizer, prompt)
        expected = reference_greedy(tiny_target, list(sample.prompt_ids), 12)
        assert list(sample.response_ids) == expected, prompt.id
        # and the same as HF's own unbatched generate
        hf = tiny_target.model.generate(
            input_ids=torch.tensor([sample.prompt_ids]), max_new_tokens=12, do_sample=False
        )
        assert hf[0, len(sample.prompt_ids) :].tolist()[: len(expected)] == expected
        assert sample.source == "prompt"
    assert stats.tokens == sum(len(s.response_ids) for s in samples.values())


def test_response_cut_after_first_eos(
    tiny_target: TargetModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos = min(tiny_target.eos_token_ids)
    tails = [[7, 8, eos, eos, eos], [9, 10, 11, 12, 13]]  # the second row never stops

    def fake_generate(*, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = torch.tensor(tails[: input_ids.shape[0]])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(tiny_target.model, "generate", fake_generate)
    prompts = [
        Prompt(id="a", messages=None, text="Hi", source="prompt"),
        Prompt(id="b", messages=None, text="Hi there", source="prompt"),
    ]
    stats = regenerate(
        tiny_target, prompts, tmp_path, max_new_tokens=5, batch_size=2, progress=False,
        engine="generate",
    )  # fmt: skip
    samples = by_id(tmp_path)
    assert samples["a"].response_ids == (7, 8, eos) and samples["a"].finish_reason == "stop"
    assert samples["b"].response_ids == (9, 10, 11, 12, 13)
    assert samples["b"].finish_reason == "length"
    assert stats.tokens == 8
    assert read_manifest(tmp_path)["finish_reasons"] == {"stop": 1, "length": 1}


def test_shards_and_manifest(tiny_target: TargetModel, tmp_path: Path) -> None:
    prompts = make_prompts(7)
    regenerate(
        tiny_target, prompts, tmp_path, max_new_tokens=4, batch_size=2, shard_size=3, progress=False
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["manifest.json", "shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    lines = (tmp_path / "shard-00000.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert set(record) == {"prompt_id", "source", "prompt_ids", "response_ids", "finish_reason"}
    assert [json.loads(line)["prompt_id"] for line in lines] == ["q0", "q1", "q2"]  # given order
    manifest = read_manifest(tmp_path)
    samples = list(iter_samples(tmp_path))
    assert manifest["target"] == tiny_target.name
    assert manifest["settings"]["max_new_tokens"] == 4
    assert manifest["settings"]["temperature"] == 0.0
    assert [s["file"] for s in manifest["shards"]] == names[1:]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["samples"] == 7 == len(samples)
    assert manifest["response_tokens"] == sum(len(s.response_ids) for s in samples)
    assert [s.prompt_id for s in samples] == [p.id for p in prompts]


def test_resume_skips_completed_prompts(
    tiny_target: TargetModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = make_prompts(10)
    kwargs: dict[str, Any] = {
        "max_new_tokens": 6,
        "batch_size": 2,
        "shard_size": 3,
        "progress": False,
        "engine": "generate",  # counts generate calls
    }
    regenerate(tiny_target, prompts, tmp_path / "full", **kwargs)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        regenerate(tiny_target, prompts, part, on_shard=StopAfter(2), **kwargs)
    shards = sorted(part.glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    (part / "shard-00002.jsonl.999.tmp").write_text('{"prompt_id": "q6", "trunc')  # a torn write

    counter = CountingGenerate(tiny_target.model.generate)
    monkeypatch.setattr(tiny_target.model, "generate", counter)
    stats = regenerate(tiny_target, prompts, part, **kwargs)
    assert counter.rows == 4  # only the 4 prompts not yet done
    assert (stats.prompts, stats.skipped, stats.shards) == (4, 6, 2)
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes  # untouched
    assert not list(part.glob("*.tmp"))
    assert by_id(part) == by_id(tmp_path / "full")
    assert read_manifest(part)["samples"] == 10
    # every shard keeps the target's generation seconds across the resumes
    assert all(s["generate_s"] > 0 for s in read_manifest(part)["shards"])

    counter.rows = 0  # a third run finds nothing to do
    again = regenerate(tiny_target, prompts, part, **kwargs)
    assert (counter.rows, again.prompts, again.skipped) == (0, 0, 10)


def test_sampled_resume_reproduces_uninterrupted_run(
    tiny_target: TargetModel, tmp_path: Path
) -> None:
    prompts = make_prompts(6)
    kwargs: dict[str, Any] = {
        "max_new_tokens": 8,
        "batch_size": 3,
        "shard_size": 2,
        "temperature": 1.5,
        "top_p": 0.95,
        "seed": 3,
        "progress": False,
    }
    regenerate(tiny_target, prompts, tmp_path / "full", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        regenerate(tiny_target, prompts, tmp_path / "part", on_shard=StopAfter(1), **kwargs)
    regenerate(tiny_target, prompts, tmp_path / "part", **kwargs)
    full = by_id(tmp_path / "full")
    assert by_id(tmp_path / "part") == full
    greedy = {p: reference_greedy(tiny_target, list(s.prompt_ids), 8) for p, s in full.items()}
    assert any(list(s.response_ids) != greedy[p] for p, s in full.items())  # really sampled


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("max_new_tokens", {"max_new_tokens": 5}),
        ("temperature", {"temperature": 0.7}),
        ("target", {"name": "another-target"}),
    ],
)
def test_settings_mismatch_raises(
    tiny_target: TargetModel, tmp_path: Path, field: str, change: dict[str, Any]
) -> None:
    prompts = make_prompts(2)
    regenerate(tiny_target, prompts, tmp_path, max_new_tokens=4, batch_size=2, progress=False)
    target = tiny_target
    if "name" in change:
        target = TargetModel(tiny_target.model, tiny_target.tokenizer, name=change.pop("name"))
    settings: dict[str, Any] = {"max_new_tokens": 4, **change}
    with pytest.raises(ValueError, match=f"^{field} mismatch"):
        regenerate(target, prompts, tmp_path, batch_size=2, progress=False, **settings)


def test_duplicate_prompt_ids_raise(tiny_target: TargetModel, tmp_path: Path) -> None:
    prompts = make_prompts(2) + make_prompts(1)
    with pytest.raises(ValueError, match="'q0' appears twice"):
        regenerate(tiny_target, prompts, tmp_path, max_new_tokens=2, batch_size=1, progress=False)


def test_collate_masks() -> None:
    samples = [
        Sample(prompt_id="a", prompt_ids=(5, 6, 7), response_ids=(8, 9)),
        Sample(prompt_id="b", prompt_ids=(1,), response_ids=(2, 3, 4, 0)),
        Sample(prompt_id="c", prompt_ids=(11, 12), response_ids=()),
    ]
    batch = collate(samples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0], [11, 12, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [
        [False, False, False, True, True],
        [False, True, True, True, True],  # the response's EOS (= pad id here) is a target too
        [False, False, False, False, False],
    ]
    short = collate(samples, pad_id=0, max_length=3)
    assert short.input_ids.tolist() == [[5, 6, 7], [1, 2, 3], [11, 12, 0]]
    assert short.loss_mask.tolist() == [[False] * 3, [False, True, True], [False] * 3]


def test_target_features_right_padded_matches_unpadded(tiny_target: TargetModel) -> None:
    samples = [
        Sample(prompt_id="a", prompt_ids=(5, 6, 7, 8, 9, 10), response_ids=(11, 12)),
        Sample(prompt_id="b", prompt_ids=(20, 21), response_ids=(22,)),
    ]
    batch = collate(samples, pad_id=0)
    out = target_features(tiny_target, batch.input_ids, batch.attention_mask)
    features, logits = out  # unpacks like a tuple
    assert features.shape == (2, 8, 3 * tiny_target.hidden_size)
    assert logits.shape == (2, 8, tiny_target.vocab_size)
    for row, sample in enumerate(samples):
        ids = list(sample.prompt_ids + sample.response_ids)
        ref = tiny_target.forward(torch.tensor([ids]), want_features=True)
        assert ref.features is not None
        n = len(ids)
        torch.testing.assert_close(features[row, :n], ref.features[0])
        torch.testing.assert_close(logits[row, :n], ref.logits[0])

    # the outputs are ordinary no-grad tensors: a drafter can train on them
    layer = torch.nn.Linear(features.shape[-1], 3)
    layer(features).sum().backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


def test_target_features_rejects_left_padding(tiny_target: TargetModel) -> None:
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        target_features(tiny_target, ids, mask)
