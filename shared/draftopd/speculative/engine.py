"""The decode loop: plain autoregressive decoding and chain speculative decoding.

One cycle (docs/draft_opd.md, "Notation"): the proposer drafts d_1..d_k from the committed
prefix; the target scores [last committed, d_1..d_k] in ONE forward; verification accepts m drafts
and picks a
bonus token; m + 1 tokens are committed and the target's KV cache is cropped to the kept prefix.
The target's KV always covers every committed token except the last one.

Plain decoding is the same loop with no proposer (k = 0), so both paths share every line that
touches the model and the greedy outputs can be compared token for token.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from draftopd.models.lean_llama import StaticKVCache
from draftopd.models.target import TargetModel, crop_cache
from draftopd.speculative.detokenize import IncrementalDetokenizer
from draftopd.speculative.proposers import Proposal, Proposer
from draftopd.speculative.records import Cycle
from draftopd.speculative.sampling import SamplingParams, probs_from_logits
from draftopd.speculative.tree import (
    TreeLayout,
    TreeVerdict,
    verify_tree_greedy,
    verify_tree_sampling,
)
from draftopd.speculative.verify import Verdict, verify_greedy, verify_sampling


@dataclass
class DecodeStats:
    cycles: int = 0
    committed: int = 0  # every token committed by a cycle (the bonus included)
    drafts: int = 0  # cycles that proposed at least one token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)  # index j-1: drafts accepted at j
    proposed_by_position: list[int] = field(default_factory=list)
    lookup_cycles: int = 0  # cycles drafted by LookupFirstProposer's lookup (Proposal.lookup)
    lookup_committed: int = 0  # tokens those cycles committed (their tau = this / lookup_cycles)
    tree_cycles: int = 0  # cycles that verified a draft tree (by position then means by depth)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tau(self) -> float:
        """Acceptance length: committed tokens / cycles (the bonus counts)."""
        return self.committed / self.cycles if self.cycles else 0.0

    def add(
        self, proposed: int, accepted: int, *, lookup: bool = False, nodes: int | None = None
    ) -> None:
        """One cycle: ``proposed`` drafts in a chain (for a tree: its depth, with ``nodes``
        drafted tokens), ``accepted`` of them committed."""
        self.cycles += 1
        self.lookup_cycles += int(lookup)
        self.lookup_committed += (accepted + 1) if lookup else 0
        self.tree_cycles += int(nodes is not None)
        self.committed += accepted + 1
        self.drafts += int(proposed > 0)
        self.draft_tokens += proposed if nodes is None else nodes
        self.accepted_tokens += accepted
        while len(self.proposed_by_position) < proposed:
            self.proposed_by_position.append(0)
            self.accepted_by_position.append(0)
        for j in range(proposed):
            self.proposed_by_position[j] += 1
            self.accepted_by_position[j] += int(j < accepted)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # the output: cut after EOS, after a stop string, or at max_new_tokens
    text: str
    finish_reason: str  # "stop" | "length"
    stats: DecodeStats
    committed_ids: list[int]  # everything the cycles committed (== token_ids unless cut early)
    cycles: list[Cycle] | None  # only when recording


@dataclass(frozen=True)
class Delta:
    """What one cycle added to the visible output (for streaming)."""

    token_ids: list[int]
    text: str


class DecodeEngine:
    """Runs requests against one target and (optionally) one proposer factory."""

    def __init__(self, target: TargetModel, *, num_draft_tokens: int = 4) -> None:
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        self.target = target
        self.num_draft_tokens = num_draft_tokens

    def start(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        proposer: Proposer | None = None,
        num_draft_tokens: int | None = None,
        record: bool = False,
        decode_text: bool = True,
    ) -> DecodeRun:
        k = self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        return DecodeRun(
            self.target,
            prompt_ids,
            params,
            proposer=proposer,
            num_draft_tokens=k,
            record=record,
            decode_text=decode_text,
        )

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        proposer: Proposer | None = None,
        num_draft_tokens: int | None = None,
        record: bool = False,
        decode_text: bool = True,
    ) -> GenerationResult:
        run = self.start(
            prompt_ids,
            params,
            proposer=proposer,
            num_draft_tokens=num_draft_tokens,
            record=record,
            decode_text=decode_text,
        )
        for _ in run:
            pass
        return run.result


class DecodeRun:
    """One request. Iterate it to run cycles (each yields a Delta); then read ``result``."""

    def __init__(
        self,
        target: TargetModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        proposer: Proposer | None,
        num_draft_tokens: int,
        record: bool,
        decode_text: bool,
    ) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        self.target = target
        self.params = params
        self.proposer = proposer
        self.k = num_draft_tokens if proposer is not None else 0
        self.record = record
        self.decode_text = decode_text or bool(params.stop)
        self.prompt_ids = list(prompt_ids)
        self.response: list[int] = []  # every committed token
        self.visible = 0  # how many response tokens are part of the output
        self.text = ""
        self.emitted_text = 0
        self.finish_reason: str | None = None
        self.cycles: list[Cycle] = []
        self.stats = DecodeStats()
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=target.device)
            # an unseeded request draws its seed without touching torch's global generators
            self.generator.manual_seed(
                params.seed if params.seed is not None else secrets.randbits(63)
            )
        self.want_features = proposer is not None and proposer.needs_features
        self.cache = target.new_decode_cache()
        self.detokenizer = IncrementalDetokenizer(self._decode)
        self._result: GenerationResult | None = None

    # -- the loop ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Delta]:
        self._prefill()
        t0 = time.perf_counter()
        while self.finish_reason is None:
            committed = self._cycle()
            delta = self._extend(committed)
            if delta.token_ids or delta.text:
                yield delta
        self.stats.decode_s = time.perf_counter() - t0
        tail = self._flush_text()
        if tail:
            yield Delta(token_ids=[], text=tail)

    def _prefill(self) -> None:
        t0 = time.perf_counter()
        features = None
        if len(self.prompt_ids) > 1:
            ids = torch.tensor([self.prompt_ids[:-1]], device=self.target.device)
            out = self.target.forward(
                ids, self.cache, want_features=self.want_features, last_logits_only=True
            )
            features = out.features[0] if out.features is not None else None
        if self.proposer is not None:
            self.proposer.start(self.prompt_ids, features)
        self.stats.prefill_s = time.perf_counter() - t0

    def _cycle(self) -> list[int]:
        context = self.prompt_ids + self.response
        remaining = self.params.max_new_tokens - len(self.response)
        k = min(self.k, remaining - 1)  # never commit past max_new_tokens
        proposal = Proposal(tokens=[], q=None)
        if k > 0 and self.proposer is not None:
            proposal = self.proposer.propose(context, k, self.params, self.generator)
        if proposal.parents is not None:
            return self._tree_cycle(context, proposal)
        draft = proposal.tokens[:k]
        block = torch.tensor([[context[-1], *draft]], device=self.target.device)  # [1, k + 1]
        out = self.target.forward(block, self.cache, want_features=self.want_features)
        logits = out.logits[0]  # [k + 1, vocab]
        verdict = self._verify(draft, logits, proposal)
        committed = [*draft[: verdict.accepted], verdict.bonus]
        # keep [last committed, accepted drafts] in the target's KV; the bonus is fed next cycle
        crop_cache(self.cache, len(context) + verdict.accepted)
        if self.proposer is not None:
            kept = out.features[0, : verdict.accepted + 1] if out.features is not None else None
            self.proposer.commit(committed, kept)
        if self.record:
            self.cycles.append(self._make_cycle(draft, verdict, committed, logits))
        self.stats.add(len(draft), verdict.accepted, lookup=proposal.lookup)
        return committed

    def _tree_cycle(self, context: list[int], proposal: Proposal) -> list[int]:
        """Score the whole draft tree in one forward, walk it down, keep the accepted path."""
        assert proposal.parents is not None and len(proposal.parents) == len(proposal.tokens)
        if self.record:
            raise ValueError("rollout records are chain cycles; record with a chain proposer")
        if not isinstance(self.cache, StaticKVCache):
            raise ValueError("tree drafts need the lean decode step (step 'lean' or 'auto')")
        layout = TreeLayout.from_proposal(proposal.parents)
        tokens = [context[-1], *proposal.tokens]
        block = torch.tensor([tokens], device=self.target.device)  # [1, T]
        out = self.target.forward(block, self.cache, want_features=self.want_features, tree=layout)
        logits = out.logits[0]  # [T, vocab]
        verdict: TreeVerdict
        if self.params.greedy:
            verdict = verify_tree_greedy(tokens, layout, logits)
        else:
            p = probs_from_logits(logits, self.params)  # [T, vocab]
            verdict = verify_tree_sampling(tokens, layout, p, self.generator)
        committed = [*(tokens[i] for i in verdict.path), verdict.bonus]
        kept = [0, *verdict.path]  # [last committed, accepted drafts], as for a chain
        self.cache.keep(len(context) - 1, kept)
        if self.proposer is not None:
            features = out.features[0, kept] if out.features is not None else None
            self.proposer.commit(committed, features)
        depth = max(layout.depths)
        self.stats.add(depth, verdict.accepted, nodes=len(proposal.tokens))
        return committed

    def _verify(self, draft: list[int], logits: torch.Tensor, proposal: Proposal) -> Verdict:
        draft_t = torch.tensor(draft, dtype=torch.long, device=logits.device)
        if self.params.greedy:
            return verify_greedy(draft_t, logits)
        p = probs_from_logits(logits, self.params)  # [k + 1, vocab]
        q = proposal.q[: len(draft)].to(p.device) if proposal.q is not None else None
        return verify_sampling(draft_t, p, q, self.generator)

    def _make_cycle(
        self, draft: list[int], verdict: Verdict, committed: list[int], logits: torch.Tensor
    ) -> Cycle:
        m = verdict.accepted
        rejected: list[float] = []
        if m < len(draft):
            logp = torch.log_softmax(logits[m : len(draft)].float(), dim=-1)  # [k - m, vocab]
            index = torch.tensor(draft[m:], device=logp.device)[:, None]
            rejected = logp.gather(-1, index)[:, 0].tolist()
        return Cycle(
            anchor=len(self.response) - 1,
            proposed=list(draft),
            accepted=m,
            committed=list(committed),
            rejected_teacher_logprobs=rejected,
        )

    # -- stopping and text ------------------------------------------------------------------
    def _extend(self, committed: list[int]) -> Delta:
        before = self.visible
        self.response.extend(committed)
        eos = self.target.eos_token_ids
        for token in committed:
            self.visible += 1
            if token in eos and not self.params.ignore_eos:
                self.finish_reason = "stop"
                break
        if self.finish_reason is None and len(self.response) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.decode_text:
            self._update_text()
        return Delta(token_ids=self.response[before : self.visible], text=self._text_delta())

    def _decode(self, ids: Sequence[int]) -> str:
        tokenizer = self.target.tokenizer
        if tokenizer is None:
            return ""
        return str(tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]

    def _update_text(self) -> None:
        self.text = self.detokenizer.text(self.response[: self.visible])
        hits = [(self.text.find(s), s) for s in self.params.stop if s and s in self.text]
        if not hits:
            return
        index, stop = min(hits)
        # shortest token prefix whose text already contains the stop string
        while self.visible > 1 and stop in self._decode(self.response[: self.visible - 1]):
            self.visible -= 1
        self.text = self.text[:index]
        self.finish_reason = "stop"

    def _text_delta(self) -> str:
        """Text safe to emit now: hold back a partial UTF-8 char and a possible stop prefix."""
        if not self.decode_text:
            return ""
        end = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                end -= 1
            if self.params.stop:
                end -= max(len(s) for s in self.params.stop) - 1
        end = max(end, self.emitted_text)
        delta = self.text[self.emitted_text : end]
        self.emitted_text = end
        return delta

    def _flush_text(self) -> str:
        delta = self.text[self.emitted_text :] if self.decode_text else ""
        self.emitted_text = len(self.text)
        return delta

    @property
    def result(self) -> GenerationResult:
        if self.finish_reason is None:
            raise ValueError("the run has not finished; iterate it first")
        if self._result is None:
            text = self.text if self.decode_text else self._decode(self.response[: self.visible])
            self._result = GenerationResult(
                prompt_ids=self.prompt_ids,
                token_ids=self.response[: self.visible],
                text=text,
                finish_reason=self.finish_reason,
                stats=self.stats,
                committed_ids=list(self.response),
                cycles=self.cycles if self.record else None,
            )
        return self._result
