"""Batched greedy rollouts: the records that speculative decoding would write, made in batch.

Under greedy verification the text of a rollout is the target's own greedy continuation, whatever
the drafter is (docs/draft_opd.md). Only the cycles depend on the drafter. So a greedy rollout
batch can
be made with a few batched passes instead of one target forward per cycle:

1. The target's greedy continuation of every prompt, not stopping at EOS (so the tokens the
   engine commits after an EOS inside a cycle are known too): continuous batching on the lean
   step (``models/lean_batch.py``, as SFT data generation) where the target has it, else a
   left-padded batched decode on the Hugging Face model.
2. One target forward over prompt + continuation (features, logits and a KV cache). The drafter
   then drafts K tokens from every possible anchor at once (``Drafter.draft_from_anchors``, with its
   own argmax fed back, as its proposer does).
3. A walk over the cycles with the engine's rules: k = min(K, remaining - 1) drafts, m = the
   longest prefix equal to the text, commit m + 1 tokens, and stop at EOS or ``max_new_tokens``.
4. The teacher log-probs of the rejected drafts. The first rejected slot is on the text, so its
   log-prob comes from step 2's logits. Later rejected slots follow the drafter's own wrong
   tokens; one more target forward reads them all: every rejected branch is appended to the cached
   text under a tree mask (each branch sees its text prefix and its own earlier tokens).

The records equal the engine's (``make_rollouts`` at temperature 0) up to floating-point
near-ties; a test checks equality on tiny models. The engine stays the reference and the only
path for sampled rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from draftopd.models.drafter import Drafter
from draftopd.models.lean_batch import batched_greedy
from draftopd.models.target import TargetModel
from draftopd.speculative.records import Cycle, RolloutRecord

# prompt + response token ids -> (fused features [T, 3H], logits [T, V]) of that text
TargetOutputs = dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SimulatedCycle:
    anchor: int  # response index of the last committed token when drafting starts (-1 = prompt)
    proposed: list[int]  # d_1..d_k
    accepted: int  # m
    committed: list[int]  # d_1..d_m and the bonus


def greedy_continuations(
    target: TargetModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Exactly ``max_new_tokens`` greedy tokens per prompt (no stop at EOS), batched by length."""
    if target.step == "lean":  # continuous batching: no EOS, so every prompt runs to the end
        return batched_greedy(target.lean, prompts, max_new_tokens=max_new_tokens, slots=batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _greedy_batch(target, [list(prompts[i]) for i in rows], max_new_tokens)
        for row, tokens in zip(rows, batch, strict=True):
            out[row] = tokens
    return out


@torch.inference_mode()
def _greedy_batch(target: TargetModel, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Left-padded greedy decoding with a KV cache; positions count real tokens only."""
    width = max(len(p) for p in prompts)
    device = target.device
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, width]
    cache = target.new_cache()
    tokens: list[torch.Tensor] = []
    step_ids = ids
    for _ in range(steps):
        out = target.model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        step_ids = out.logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
        tokens.append(step_ids)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
        positions = positions[:, -1:] + 1
    return torch.cat(tokens, dim=-1).cpu().tolist()


def walk_cycles(
    response: Sequence[int],
    drafts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    eos: frozenset[int],
) -> list[SimulatedCycle]:
    """The engine's greedy cycles over ``response`` (the target's greedy text, at least
    ``max_new_tokens`` long). ``drafts[j]`` is what the drafter proposes from response index j-1
    (j = 0: from the prompt's last token)."""
    cycles: list[SimulatedCycle] = []
    done = 0
    while done < max_new_tokens:
        k = min(num_draft_tokens, max_new_tokens - done - 1)
        proposed = list(drafts[done][:k]) if k > 0 else []
        text = response[done : done + k]
        accepted = next(
            (j for j, (d, t) in enumerate(zip(proposed, text, strict=True)) if d != t), k
        )
        committed = list(response[done : done + accepted + 1])
        cycles.append(SimulatedCycle(done - 1, proposed, accepted, committed))
        done += accepted + 1
        if any(token in eos for token in committed):
            break
    return cycles


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row))
        mask[i, : len(row)] = 1
    return ids, mask


@dataclass
class _TextPass:
    features: torch.Tensor  # [b, T, 3H]
    logits: torch.Tensor  # [b, T, V]
    cache: DynamicCache


def _text_pass(target: TargetModel, ids: torch.Tensor, mask: torch.Tensor) -> _TextPass:
    with torch.inference_mode():
        out = target.model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True
        )
    return _TextPass(_fused(target, out.hidden_states), out.logits, out.past_key_values)


def _fused(target: TargetModel, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output.
    return torch.cat([hidden_states[i + 1] for i in target.feature_layers], dim=-1)


@torch.inference_mode()
def text_features(target: TargetModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, T, 3H] fused target features of a right-padded batch (no logits kept, no cache)."""
    out = target.model(
        input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
    )
    return _fused(target, out.hidden_states)


@torch.inference_mode()
def draft_everywhere(
    drafter: Drafter,
    features: torch.Tensor,  # [b, T, 3H]
    ids: torch.Tensor,  # [b, T] right-padded prompt + response
    prompt_lens: list[int],
    *,
    slots: int,
    steps: int,
) -> torch.Tensor:
    """[b, steps, K] target ids: column j drafts from response index j-1 (anchor P-1+j)."""
    columns = torch.arange(steps, device=ids.device)
    anchors = torch.tensor(prompt_lens, device=ids.device)[:, None] - 1 + columns  # [b, C]
    logits = drafter.draft_from_anchors(features, ids, anchors, slots)  # [b, C, K, Vd]
    return drafter.d2t[logits.argmax(-1)].cpu()


def _branch_logprobs(
    target: TargetModel,
    text: _TextPass,
    prompt_lens: list[int],
    all_cycles: list[list[SimulatedCycle]],
) -> list[list[list[float]]]:
    """Teacher log-probs of every rejected draft: [row][cycle][slot m+1..k]."""
    width = text.logits.shape[1]
    # per row: (cycle, prefix_end, token, next) for the branch tokens d_{m+1}..d_{k-1}, each
    # read after text[: anchor+m+1] and the branch so far; ``next`` is the draft whose log-prob
    # the target's output at that token gives (d_{m+2}..d_k)
    branches: list[list[tuple[int, int, int, int]]] = []
    for row, cycles in enumerate(all_cycles):
        items = []
        for c, cycle in enumerate(cycles):
            prefix_end = prompt_lens[row] + cycle.anchor + cycle.accepted  # last text position
            proposed = cycle.proposed
            for slot in range(cycle.accepted, len(proposed) - 1):
                items.append((c, prefix_end, proposed[slot], proposed[slot + 1]))
        branches.append(items)
    later: list[list[float]] = [[] for _ in branches]
    depth = max((len(b) for b in branches), default=0)
    if depth:
        later = _branch_pass(target, text, branches, width, depth).tolist()
    result: list[list[list[float]]] = []
    for row, cycles in enumerate(all_cycles):
        per_row: list[list[float]] = []
        position = 0  # index into this row's branch tokens
        for cycle in cycles:
            m, k = cycle.accepted, len(cycle.proposed)
            values: list[float] = []
            if m < k:  # the first rejected slot reads the text's own logits
                at = prompt_lens[row] + cycle.anchor + m
                logp = torch.log_softmax(text.logits[row, at].float(), dim=-1)  # [V]
                values.append(float(logp[cycle.proposed[m]]))
                for _ in range(m + 1, k):
                    values.append(later[row][position])
                    position += 1
            per_row.append(values)
        result.append(per_row)
    return result


HEAD_CHUNK = 1024  # branch positions per LM-head product (a [chunk, V] float32 block at a time)


def _branch_pass(
    target: TargetModel,
    text: _TextPass,
    branches: list[list[tuple[int, int, int, int]]],
    width: int,
    depth: int,
) -> torch.Tensor:
    """log p(next | text prefix, branch so far) at each branch token: [b, depth] (0 on padding).
    Branch token j of a cycle sits at position prefix_end + 1 + j and attends to
    text[0..prefix_end] and to its branch so far. Only the wanted entry of each position's
    distribution is kept: the LM head runs in chunks over the decoder's last hidden states, so
    no [b, depth, V] logits are ever held (they were most of this pass's memory traffic)."""
    b = len(branches)
    device = target.device
    ids = torch.zeros((b, depth), dtype=torch.long)
    wanted = torch.zeros((b, depth), dtype=torch.long)
    positions = torch.zeros((b, depth), dtype=torch.long)
    mask = torch.zeros((b, 1, depth, width + depth), dtype=torch.bool)
    for row, items in enumerate(branches):
        start = 0
        for q, (cycle, prefix_end, token, following) in enumerate(items):
            if q > 0 and items[q - 1][0] != cycle:
                start = q  # a new branch begins
            ids[row, q] = token
            wanted[row, q] = following
            positions[row, q] = prefix_end + 1 + (q - start)
            mask[row, 0, q, : prefix_end + 1] = True
            mask[row, 0, q, width + start : width + q + 1] = True
        for q in range(len(items), depth):
            mask[row, 0, q, width + q] = True  # padding attends to itself only
    with torch.inference_mode():
        hidden = target.model.get_decoder()(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=text.cache,
            use_cache=True,
        ).last_hidden_state.reshape(b * depth, -1)
        head = target.model.get_output_embeddings()
        flat = wanted.to(device).reshape(-1)
        out = torch.empty(b * depth, dtype=torch.float32, device=device)
        for lo in range(0, b * depth, HEAD_CHUNK):
            logits = head(hidden[lo : lo + HEAD_CHUNK]).float()  # [chunk, V]
            picked = logits.gather(1, flat[lo : lo + HEAD_CHUNK, None])[:, 0]
            out[lo : lo + HEAD_CHUNK] = picked - logits.logsumexp(-1)
    return out.reshape(b, depth).cpu()


def batched_greedy_rollouts(
    target: TargetModel,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    batch_size: int = 8,
    job_id: str = "local",
    drafter_version: str = "0",
    texts: Sequence[Sequence[int]] | None = None,
    target_outputs: TargetOutputs | None = None,
) -> list[RolloutRecord]:
    """One greedy ``RolloutRecord`` per prompt, as ``make_rollouts`` writes at temperature 0.

    ``texts`` are the prompts' greedy continuations (``greedy_continuations``) when the caller
    already has them. They do not depend on the drafter, so a trainer can write them for all its
    prompts once, in large batches, and roll out every step with its current drafter on them:
    the records are the same.

    ``target_outputs``, when given, receives the text pass's fused features and logits of each
    record's prompt + response, keyed by those token ids: the learner in the same process
    replays from them instead of running the target over the same text again (``replay_loss``)."""
    if any(len(p) < 2 for p in prompts):
        raise ValueError("every prompt needs at least 2 tokens (the drafter reads prompt[:-1])")
    if texts is None:
        texts = greedy_continuations(
            target, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    elif len(texts) != len(prompts) or any(len(t) != max_new_tokens for t in texts):
        raise ValueError(f"texts must be one {max_new_tokens}-token continuation per prompt")
    num_draft_tokens = drafter.drafts_per_cycle(num_draft_tokens)  # as the proposer caps it
    was_training = drafter.training
    drafter.eval()
    records: list[RolloutRecord] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            records.extend(
                _records_of_batch(
                    target,
                    drafter,
                    [list(prompts[i]) for i in rows],
                    [list(texts[i]) for i in rows],
                    num_draft_tokens=num_draft_tokens,
                    max_new_tokens=max_new_tokens,
                    job_id=job_id,
                    drafter_version=drafter_version,
                    target_outputs=target_outputs,
                )
            )
    finally:
        drafter.train(was_training)
    return records


def _records_of_batch(
    target: TargetModel,
    drafter: Drafter,
    prompts: list[list[int]],
    texts: list[list[int]],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    job_id: str,
    drafter_version: str,
    target_outputs: TargetOutputs | None = None,
) -> list[RolloutRecord]:
    prompt_lens = [len(p) for p in prompts]
    ids, mask = right_pad([p + t for p, t in zip(prompts, texts, strict=True)], pad_id=0)
    ids, mask = ids.to(target.device), mask.to(target.device)
    text = _text_pass(target, ids, mask)
    drafts = draft_everywhere(
        drafter, text.features, ids, prompt_lens, slots=num_draft_tokens, steps=max_new_tokens
    ).tolist()
    eos = target.eos_token_ids
    all_cycles = [
        walk_cycles(
            texts[row],
            drafts[row],
            num_draft_tokens=num_draft_tokens,
            max_new_tokens=max_new_tokens,
            eos=eos,
        )
        for row in range(len(prompts))
    ]
    logprobs = _branch_logprobs(target, text, prompt_lens, all_cycles)
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
    records = []
    for row, cycles in enumerate(all_cycles):
        response = [t for c in cycles for t in c.committed]
        visible = next((i + 1 for i, t in enumerate(response) if t in eos), len(response))
        if target_outputs is not None:  # the response is a prefix of the text: causal, so equal
            end = prompt_lens[row] + len(response)
            key = (*prompts[row], *response)
            target_outputs[key] = (text.features[row, :end], text.logits[row, :end])
        records.append(
            RolloutRecord(
                job_id=job_id,
                drafter_version=drafter_version,
                target_model=target.name,
                sampling=dict(sampling),
                prompt_ids=prompts[row],
                response_ids=response,
                cycles=[
                    Cycle(
                        anchor=c.anchor,
                        proposed=c.proposed,
                        accepted=c.accepted,
                        committed=c.committed,
                        rejected_teacher_logprobs=lp,
                    )
                    for c, lp in zip(cycles, logprobs[row], strict=True)
                ],
                output_len=min(visible, max_new_tokens),
            )
        )
    return records


__all__ = [
    "SimulatedCycle",
    "TargetOutputs",
    "batched_greedy_rollouts",
    "draft_everywhere",
    "greedy_continuations",
    "right_pad",
    "text_features",
    "walk_cycles",
]
