"""Fixtures shared by the SFT and Draft-OPD tests: a learnable tiny target and its samples."""

from __future__ import annotations

import pytest
import torch

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel, load_target
from draftopd.models.tiny import build_tiny_target
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams
from draftopd.training.data.regenerate import Sample
from draftopd.training.sft.train import train_sft
from tests.unit.training.helpers import TINY_SFT

MAX_NEW = 32


@pytest.fixture(scope="session")
def sharp_target(tmp_path_factory: pytest.TempPathFactory) -> TargetModel:
    """The tiny target (small init: repetitive, learnable greedy text) with its LM head scaled
    x30. Scaling keeps every argmax, so the greedy text is unchanged, but the distributions get
    peaked like a trained LM's; otherwise soft CE is almost all entropy and barely moves."""
    target = load_target(str(build_tiny_target(tmp_path_factory.mktemp("sharp"), init_std=0.02)))
    with torch.no_grad():
        target.model.lm_head.weight.mul_(30.0)
    return target


def generate_samples(target: TargetModel, count: int, seed: int) -> list[Sample]:
    """Target-written samples: the target's own greedy continuations of random prompts."""
    engine = DecodeEngine(target)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(count):
        prompt = torch.randint(4, target.vocab_size, (6,), generator=generator).tolist()
        result = engine.generate(prompt, params, decode_text=False)
        samples.append(Sample(f"{seed}-{k}", tuple(prompt), tuple(result.token_ids)))
    return samples


@pytest.fixture(scope="session")
def corpus(sharp_target: TargetModel) -> tuple[list[Sample], list[list[int]]]:
    train = generate_samples(sharp_target, 128, seed=0)
    heldout = [list(s.prompt_ids) for s in generate_samples(sharp_target, 6, seed=1)]
    return train, heldout


@pytest.fixture(scope="session")
def half_trained_drafter(
    sharp_target: TargetModel,
    corpus: tuple[list[Sample], list[list[int]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Drafter:
    """A drafter after a short SFT: some drafts accepted, many rejected (both replay streams)."""
    cfg = TINY_SFT
    out = tmp_path_factory.mktemp("half-sft")
    return train_sft(sharp_target, corpus[0], out, cfg, progress=False).drafter.eval()
