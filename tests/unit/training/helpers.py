"""Small configs the training tests share (the learnable tiny target of tests/unit/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

from draftopd.training.configs import SFTConfig

# a short SFT on the sharp tiny target: a fast LR, 4 TTT steps and a 96-token draft vocab
TINY_SFT = SFTConfig(
    lr=1e-2,
    warmup_steps=3,
    total_steps=25,
    batch_size=8,
    max_seq_len=64,
    ttt_steps=4,
    draft_vocab_size=96,
    eval_every=0,
    checkpoint_every=0,
    seed=0,
)


def tiny_sft(**changes: object) -> SFTConfig:
    return replace(TINY_SFT, **changes)  # type: ignore[arg-type]
