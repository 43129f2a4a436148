"""EAGLE-3 training-time test (TTT), batched, and the naive per-anchor reference it must equal.

EAGLE-3 (Li et al., 2025, §3.2 "training-time test") trains the drafter on the states it meets
while drafting, not only on states built from the target's features. Drafter *entry* i pairs the
target feature at position i with token i+1 and sits at position i (as in ``Eagle3Proposer``).

- Step 0: every entry i reads (fc(F[i]), ids[i+1]) at position i under a causal mask. Its logits
  predict ids[i+2]; its output hidden is g_0[i].
- Step j = 1..S-1: entry i reads (g_{j-1}[i], ids[i+1+j]) at position i+j. It attends to the
  step-0 keys of entries 0..i and to its own keys of steps 1..j. That is exactly the drafter's
  state at inference when drafting from anchor i with the earlier drafts equal to the true tokens.

All S steps share one ``DrafterCache`` holding the keys [K_0; K_1; ...; K_j] (each block N wide);
step j queries it with the block mask [causal | I | I | ... | I] (``step_attention_mask``).

Loss at step j, entry i: soft cross-entropy from the target distribution for token ids[i+2+j]
(softmax of the target logits at position i+1+j over the draft vocabulary, i.e. restricted via
d2t and renormalised) to the drafter's log-softmax. Only response tokens inside the sequence
count. The objective is sum_j decay^j * mean_i loss_j(i).

Padding must be on the right: positions are absolute indices, and real entries never attend to
padded keys under the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftopd.models.eagle3.model import DrafterCache, Eagle3Drafter


@dataclass(frozen=True)
class TTTOutput:
    loss: torch.Tensor  # [] sum_j decay^j * step_loss[j], differentiable
    step_loss: torch.Tensor  # [steps] mean soft CE per step (detached)
    step_acc: torch.Tensor  # [steps] top-1 agreement with the target within the draft vocab
    step_count: torch.Tensor  # [steps] number of supervised entries per step
    logits: torch.Tensor | None = None  # [batch, steps, entries, draft_vocab] when asked for


def step_attention_mask(num_entries: int, step: int, device: torch.device) -> torch.Tensor:
    """Bool [N, (step+1)*N] over keys [K_0; K_1; ...; K_step]: causal on K_0, diagonal after."""
    causal = torch.ones(num_entries, num_entries, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(num_entries, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diagonal] * step, dim=1)


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise unless every row of the [batch, T] mask is ones followed by zeros."""
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("attention_mask must be right-padded (ones, then zeros) for TTT")


def _shift(x: torch.Tensor, start: int, length: int, fill: float | int | bool) -> torch.Tensor:
    """x[:, start : start + length] along dim 1, padded with ``fill`` past the end."""
    piece = x[:, start : start + length]
    missing = length - piece.shape[1]
    if missing <= 0:
        return piece
    pad = torch.full((x.shape[0], missing, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([piece, pad], dim=1)


@dataclass(frozen=True)
class _Targets:
    p: torch.Tensor  # [batch, T + S + 1, Vd] target distribution over the draft vocab, 0 past T
    supervised: torch.Tensor  # [batch, T + S + 1] bool: token t is a response token inside


def _targets(
    target_logits: torch.Tensor,  # [batch, T, V]
    loss_mask: torch.Tensor,  # [batch, T]
    attention_mask: torch.Tensor,  # [batch, T]
    d2t: torch.Tensor,  # [draft_vocab]
    steps: int,
    draft_vocab_logits: bool = False,
) -> _Targets:
    """Padded once by S+1 positions so every step's slice is a view. With ``draft_vocab_logits``
    the logits are already over the draft vocabulary, in d2t order (the feature cache's)."""
    length = target_logits.shape[1] + steps + 1
    with torch.no_grad():
        restricted = target_logits.detach().float()
        if not draft_vocab_logits:
            restricted = restricted.index_select(-1, d2t)  # [b, T, Vd]
        elif restricted.shape[-1] != d2t.numel():
            raise ValueError(
                f"draft-vocab logits have {restricted.shape[-1]} entries, the drafter {d2t.numel()}"
            )
        p = _shift(torch.softmax(restricted, dim=-1), 0, length, 0.0)
    supervised = _shift(loss_mask.bool() & attention_mask.bool(), 0, length, False)
    return _Targets(p=p.clone(), supervised=supervised.clone())  # plain tensors, not inference


def _step_terms(
    logits: torch.Tensor,  # [batch, N, Vd] drafter logits at step j
    targets: _Targets,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed soft CE, correct top-1 count, supervised count) for step j.

    Entry i at step j predicts token i+2+j from the target logits at position i+1+j."""
    n = logits.shape[1]
    p = targets.p[:, 1 + step : 1 + step + n]  # [b, N, Vd]
    valid = targets.supervised[:, 2 + step : 2 + step + n]  # [b, N]
    # -sum p log_softmax(z) = logsumexp(z) - sum p z   (rows of p sum to 1 where valid)
    ce = torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)  # [b, N]
    total = torch.where(valid, ce, torch.zeros_like(ce)).sum()
    correct = ((logits.argmax(-1) == p.argmax(-1)) & valid).sum()
    return total, correct, valid.sum()


def _supervised_terms(
    drafter: Eagle3Drafter,
    h: torch.Tensor,  # [b, M, H]: the entries ``entries`` of every row at step j
    targets: _Targets,
    step: int,
    entries: torch.Tensor,  # [b, M] the entry index of each row of h
    inside: torch.Tensor,  # [b, M] bool: a real entry of the row (False: filler of a window)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_step_terms`` with the LM head applied to the supervised entries only: the same sums,
    without the head's cost on prompt and padding entries."""
    valid = targets.supervised.gather(1, entries + 2 + step) & inside  # [b, M]
    rows, cols = valid.nonzero(as_tuple=True)
    logits = drafter.logits(h[rows, cols])  # [M', Vd]
    p = targets.p[rows, entries[rows, cols] + 1 + step]  # [M', Vd]
    ce = torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)  # [M']
    correct = (logits.argmax(-1) == p.argmax(-1)).sum()
    return ce.sum(), correct, valid.sum()


@dataclass(frozen=True)
class _Window:
    """Per row, the entries that carry a loss at some step >= 1: entry ``start[b] + m`` for
    m < ``count[b]``, gathered M = max(count) wide (rows with fewer repeat their last entry)."""

    entries: torch.Tensor  # [b, M] entry index
    inside: torch.Tensor  # [b, M] bool: m < count[b]

    @property
    def width(self) -> int:
        return int(self.entries.shape[1])


def _later_window(targets: _Targets, n: int, steps: int) -> _Window:
    """Steps 1..S-1 only need the entries whose own chain reaches a supervised token: an entry's
    step-j state feeds only its own step j+1 (later steps attend to step-0 keys and to their own
    chain, ``step_attention_mask``), so prompt and padding entries past step 0 change nothing."""
    needed = torch.zeros_like(targets.supervised[:, :n])
    for j in range(1, steps):
        needed |= targets.supervised[:, 2 + j : 2 + j + n]
    index = torch.arange(n, device=needed.device).expand_as(needed)
    any_needed = needed.any(dim=1)
    first = torch.where(needed, index, n).amin(dim=1)
    last = torch.where(needed, index, -1).amax(dim=1)
    start = torch.where(any_needed, first, 0)
    count = torch.where(any_needed, last - first + 1, 0)
    width = max(int(count.max()), 1)
    m = torch.arange(width, device=needed.device)
    entries = (start[:, None] + m).clamp(max=n - 1)
    return _Window(entries=entries, inside=m[None, :] < count[:, None])


def _window_mask(window: _Window, n: int, step: int) -> torch.Tensor:
    """Bool [b, 1, M, N + step*M]: ``step_attention_mask`` for a window's entries: the step-0
    keys up to the entry itself, then its own key of every later step."""
    keys = torch.arange(n, device=window.entries.device)
    causal = keys[None, None, :] <= window.entries[:, :, None]  # [b, M, N]
    diagonal = torch.eye(window.width, dtype=torch.bool, device=causal.device)
    diagonal = diagonal.expand(causal.shape[0], -1, -1)
    return torch.cat([causal] + [diagonal] * step, dim=2)[:, None]


def _combine(
    terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    decay: float,
    logits: torch.Tensor | None,
) -> TTTOutput:
    totals = torch.stack([t[0] for t in terms])  # [S]
    correct = torch.stack([t[1] for t in terms]).float()
    counts = torch.stack([t[2] for t in terms]).float()
    step_loss = totals / counts.clamp(min=1)
    weights = decay ** torch.arange(len(terms), dtype=step_loss.dtype, device=step_loss.device)
    return TTTOutput(
        loss=(weights * step_loss).sum(),
        step_loss=step_loss.detach(),
        step_acc=(correct / counts.clamp(min=1)).detach(),
        step_count=counts.detach(),
        logits=logits,
    )


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Inference-mode tensors (from a no-grad target forward) cannot be saved for backward."""
    return x.clone() if x.is_inference() else x


def ttt_unroll(
    drafter: Eagle3Drafter,
    features: torch.Tensor,  # [batch, T, 3H] target features
    input_ids: torch.Tensor,  # [batch, T]
    target_logits: torch.Tensor,  # [batch, T, V]
    loss_mask: torch.Tensor,  # [batch, T] 1 where the token is a response token
    attention_mask: torch.Tensor | None = None,  # [batch, T] right-padded; None = all valid
    *,
    steps: int = 7,
    decay: float = 0.8,
    return_logits: bool = False,
    draft_vocab_logits: bool = False,  # target_logits are [batch, T, Vd] in d2t order
) -> TTTOutput:
    """The batched TTT unroll: S drafter passes over all N = T-1 entries at once."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch, length = input_ids.shape
    if length < 2:
        raise ValueError(f"sequences need at least 2 tokens, got {length}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_right_padded(attention_mask)
    device = input_ids.device
    n = length - 1  # entries 0..T-2 (entry i reads token i+1)
    targets = _targets(
        target_logits, loss_mask, attention_mask, drafter.d2t, steps, draft_vocab_logits
    )
    cache = DrafterCache()
    positions = torch.arange(n, device=device).expand(batch, n)  # [b, N]
    hidden = drafter.project(_plain(features)[:, :n])  # [b, N, H]
    terms, all_logits = [], []
    if return_logits:  # every entry at every step, for tests against the naive reference
        for j in range(steps):
            tokens = _shift(input_ids, 1 + j, n, 0)  # [b, N]: ids[i+1+j], 0 past the end
            mask = step_attention_mask(n, j, device)
            h = drafter.layer(hidden, tokens, positions + j, cache=cache, attn_mask=mask)
            step_logits = drafter.logits(h)
            terms.append(_step_terms(step_logits, targets, j))
            all_logits.append(step_logits)
            hidden = h  # g_j, fed back at step j+1
    else:  # the LM head only where a loss is taken; after step 0, only the entries that need it
        tokens = _shift(input_ids, 1, n, 0)
        h = drafter.layer(
            hidden, tokens, positions, cache=cache, attn_mask=step_attention_mask(n, 0, device)
        )
        terms.append(_supervised_terms(drafter, h, targets, 0, positions, positions >= 0))
        if steps > 1:
            window = _later_window(targets, n, steps)
            entries = window.entries
            hidden = h.gather(1, entries[..., None].expand(-1, -1, h.shape[-1]))
            padded_ids = _shift(input_ids, 0, n + steps + 1, 0)  # ids[t], 0 past the end
            for j in range(1, steps):
                tokens = padded_ids.gather(1, entries + 1 + j)
                mask = _window_mask(window, n, j)
                h = drafter.layer(hidden, tokens, entries + j, cache=cache, attn_mask=mask)
                terms.append(_supervised_terms(drafter, h, targets, j, entries, window.inside))
                hidden = h
    logits = torch.stack(all_logits, dim=1) if return_logits else None  # [b, S, N, Vd]
    return _combine(terms, decay, logits)


def ttt_loss_from_logits(
    logits: torch.Tensor,  # [batch, steps, N, Vd]
    target_logits: torch.Tensor,  # [batch, T, V]
    loss_mask: torch.Tensor,  # [batch, T]
    attention_mask: torch.Tensor,  # [batch, T]
    d2t: torch.Tensor,  # [Vd]
    *,
    decay: float = 0.8,
) -> TTTOutput:
    """The TTT objective from precomputed per-step logits (used with the naive reference)."""
    targets = _targets(target_logits, loss_mask, attention_mask, d2t, logits.shape[1])
    terms = [_step_terms(logits[:, j], targets, j) for j in range(logits.shape[1])]
    return _combine(terms, decay, logits)


def naive_ttt_logits(
    drafter: Eagle3Drafter,
    features: torch.Tensor,  # [batch, T, 3H]
    input_ids: torch.Tensor,  # [batch, T]
    attention_mask: torch.Tensor,  # [batch, T] right-padded
    *,
    steps: int = 7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: for every anchor, draft exactly like ``Eagle3Proposer`` (slow, for tests).

    Returns (logits [batch, steps, N, Vd], defined [batch, steps, N]); an entry is defined where
    its input token ids[i+1+j] lies inside the sequence. Undefined entries are zero."""
    batch, length = input_ids.shape
    n = length - 1
    device = input_ids.device
    features = _plain(features)
    zeros = torch.zeros(drafter.cfg.draft_vocab_size, device=device)
    grid: list[list[list[torch.Tensor]]] = [
        [[zeros] * n for _ in range(steps)] for _ in range(batch)
    ]
    defined = torch.zeros(batch, steps, n, dtype=torch.bool, device=device)
    for b in range(batch):
        seq_len = int(attention_mask[b].sum())
        for anchor in range(seq_len - 1):
            cache = DrafterCache()  # fresh: entries 0..anchor, then the draft steps
            out = drafter(
                drafter.project(features[b : b + 1, : anchor + 1]),
                input_ids[b : b + 1, 1 : anchor + 2],
                torch.arange(anchor + 1, device=device)[None],
                cache=cache,
            )
            for j in range(steps):
                if j > 0:
                    if anchor + 1 + j >= seq_len:
                        break
                    out = drafter(
                        out.hidden[:, -1:],
                        input_ids[b : b + 1, anchor + 1 + j : anchor + 2 + j],
                        torch.tensor([[anchor + j]], device=device),
                        cache=cache,
                    )
                grid[b][j][anchor] = out.logits[0, -1]
                defined[b, j, anchor] = True
    logits = torch.stack([torch.stack([torch.stack(row) for row in s]) for s in grid])
    return logits, defined


__all__ = [
    "TTTOutput",
    "check_right_padded",
    "naive_ttt_logits",
    "step_attention_mask",
    "ttt_loss_from_logits",
    "ttt_unroll",
]
