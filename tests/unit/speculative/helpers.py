"""Test proposers and tiny-model builders shared by the speculative-decoding tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftopd.models.target import TargetModel
from draftopd.speculative.proposers import Proposal
from draftopd.speculative.sampling import SamplingParams


class NoisyOracleProposer:
    """Drafts the target's own greedy continuation, corrupting each draft with probability
    ``noise`` (seeded). It makes cycles with every accepted count from 0 to k, so records and
    cache bookkeeping are exercised far beyond what a random drafter reaches."""

    needs_features = False

    def __init__(self, target: TargetModel, *, noise: float = 0.3, seed: int = 0) -> None:
        self.target, self.noise = target, noise
        self.rng = torch.Generator().manual_seed(seed)

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        return None

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        return None

    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Proposal:
        ids = list(context)
        drafts: list[int] = []
        for _ in range(k):
            logits = self.target.forward(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if float(torch.rand(1, generator=self.rng)) < self.noise:
                token = (
                    token + 1 + int(torch.randint(5, (1,), generator=self.rng))
                ) % logits.numel()
            drafts.append(token)
            ids.append(token)
        return Proposal(tokens=drafts, q=None)


def small_vocab_target(vocab: int = 4, *, seed: int = 0, init_std: float = 0.6) -> TargetModel:
    """A 2-layer Llama over a tiny vocabulary with peaked distributions (no tokenizer, no EOS)."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=init_std,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return TargetModel(model, None, name=f"small-vocab-{vocab}")
