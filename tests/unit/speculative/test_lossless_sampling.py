"""Correctness check 2 (docs/draft_opd.md): speculative sampling preserves the target distribution.

A 2-layer target over a 4-token vocabulary makes 3-token continuations: 64 outcomes whose exact
probabilities we enumerate from the target. Seeded samples from plain sampling and from speculative
sampling (q-sampling drafts and argmax drafts, K = 2, so cycles see acceptance, rejection with
residual resampling, and the bonus) are compared with that exact distribution by a chi-square
test. The same test run with a known bug injected into verification must fail, which shows the
bound has the power to catch it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

import draftopd.speculative.engine as engine_module
from draftopd.models.families import family
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine, DecodeStats
from draftopd.speculative.proposers import LookupFirstProposer, NgramProposer, Proposal
from draftopd.speculative.sampling import SamplingParams, probs_from_logits
from draftopd.speculative.tree import DraftTree, TreeLayout, TreeVerdict
from draftopd.speculative.verify import Verdict, one_hot_q
from tests.unit.speculative.helpers import small_vocab_target

VOCAB, LENGTH, SAMPLES = 4, 3, 2400
PROMPT = [1, 3, 0, 2]
P_VALUE_FLOOR = 1e-3  # a correct sampler fails this with probability 1e-3 per seed set
# stop_below in the confidence-floor test. EAGLE-3's second slot depends on the first draw, so
# 0.7 cuts some of its cycles; DFlash's slots do not, so its first cycle is cut at 0.9 or never
FLOORS = {"eagle3": 0.7, "dflash": 0.9}


SETTINGS = {
    "t1": SamplingParams(max_new_tokens=LENGTH, temperature=1.0),
    "t0.8-topk3-topp0.9": SamplingParams(
        max_new_tokens=LENGTH, temperature=0.8, top_k=3, top_p=0.9
    ),
}


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return small_vocab_target(VOCAB, seed=1, init_std=0.2)


def random_drafter(target: TargetModel, name: str) -> torch.nn.Module:
    """A random drafter of a family whose q clearly differs from p, over a draft vocab of 3 of
    the 4 tokens."""
    kind = family(name)
    cfg = kind.config_for_target(
        target.config, feature_layers=target.feature_layers, draft_vocab_size=3
    )
    d = kind.random(cfg, seed=5, std=0.5)
    d.set_draft_vocab(torch.tensor([3, 0, 1]))
    d.attach_embedding(target.embed_tokens)
    return d.eval()


@pytest.fixture(scope="module", params=["eagle3", "dflash"])
def drafter(target: TargetModel, request: pytest.FixtureRequest) -> torch.nn.Module:
    return random_drafter(target, request.param)


def exact_distribution(target: TargetModel, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(continuation) for every continuation, from the processed target distributions."""
    dist: dict[tuple[int, ...], float] = {}
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        ids = torch.tensor([PROMPT + list(seq[:-1])])
        logits = target.forward(ids).logits[0, len(PROMPT) - 1 :]  # [LENGTH, vocab]
        probs = probs_from_logits(logits, params)
        dist[seq] = float(torch.prod(probs[torch.arange(LENGTH), torch.tensor(seq)]))
    return dist


def draw(
    target: TargetModel, params: SamplingParams, make_proposer: Callable[[], object] | None
) -> Counter[tuple[int, ...]]:
    engine = DecodeEngine(target, num_draft_tokens=2)
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(SAMPLES):
        run_params = replace(params, seed=seed)
        proposer = make_proposer() if make_proposer else None
        out = engine.generate(PROMPT, run_params, proposer=proposer, decode_text=False)  # type: ignore[arg-type]
        counts[tuple(out.token_ids)] += 1
    return counts


def chi_square_p(counts: Counter[tuple[int, ...]], dist: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit, pooling outcomes with expected count < 5 into one bin."""
    if any(counts[seq] for seq, prob in dist.items() if prob == 0.0):
        return 0.0  # an impossible continuation was sampled
    observed, expected = [], []
    pool_obs = pool_exp = 0.0
    for seq, prob in dist.items():
        exp = prob * SAMPLES
        if exp < 5:
            pool_obs, pool_exp = pool_obs + counts[seq], pool_exp + exp
        else:
            observed.append(counts[seq])
            expected.append(exp)
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def buggy_verify_sampling(
    draft: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> Verdict:
    """The injected bug: after a rejection, resample from p_j instead of norm(max(0, p_j - q_j))."""
    k = draft.shape[0]
    if q is None:
        q = one_hot_q(draft, p.shape[-1])
    rows = torch.arange(k)
    u = torch.rand(k, generator=generator)
    accept = u * q[rows, draft] <= p[rows, draft]
    accepted = int(accept.to(torch.int64).cumprod(0).sum()) if k else 0
    bonus = int(torch.multinomial(p[accepted], 1, generator=generator))
    return Verdict(accepted=accepted, bonus=bonus)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_plain_sampling_matches_target(target: TargetModel, setting: str) -> None:
    params = SETTINGS[setting]
    assert (
        chi_square_p(draw(target, params, None), exact_distribution(target, params)) > P_VALUE_FLOOR
    )


@pytest.mark.parametrize("argmax_drafting", [False, True], ids=["q-sampling", "argmax"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_speculative_sampling_matches_target(
    target: TargetModel, drafter: torch.nn.Module, setting: str, argmax_drafting: bool
) -> None:
    params = SETTINGS[setting]
    counts = draw(target, params, lambda: drafter.proposer(argmax_drafting=argmax_drafting))  # type: ignore[arg-type]
    assert chi_square_p(counts, exact_distribution(target, params)) > P_VALUE_FLOOR


@pytest.mark.parametrize("argmax_drafting", [False, True], ids=["q-sampling", "argmax"])
def test_a_confidence_floor_keeps_the_distribution(
    target: TargetModel, drafter: torch.nn.Module, argmax_drafting: bool
) -> None:
    """Drafts that end at the first doubtful one (``stop_below``): the length is chosen from
    the drafter's own q, so every cycle stays exact."""
    params = SETTINGS["t1"]
    engine = DecodeEngine(target, num_draft_tokens=2)
    floor = FLOORS[drafter.cfg.architecture]

    def second_slot_share(floor: float) -> float:
        """Of the cycles that proposed, the share that proposed a second draft."""
        proposed = [0, 0]
        for seed in range(200):
            proposer = drafter.proposer(argmax_drafting=argmax_drafting, stop_below=floor)  # type: ignore[operator]
            stats = engine.generate(PROMPT, replace(params, seed=seed), proposer=proposer).stats
            for j, count in enumerate(stats.proposed_by_position[:2]):
                proposed[j] += count
        return proposed[1] / proposed[0]

    assert second_slot_share(floor) < second_slot_share(0.0) - 0.1  # the floor cuts cycles short

    def make() -> object:
        return drafter.proposer(argmax_drafting=argmax_drafting, stop_below=floor)  # type: ignore[operator]

    counts = draw(target, params, make)
    assert chi_square_p(counts, exact_distribution(target, params)) > P_VALUE_FLOOR


class StopOnDrawnToken:
    """The injected bug for the floor: a drafter whose drafts end where the DRAWN second draft
    has q below 0.45 (instead of reading the distribution before the draw)."""

    needs_features = True

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.inner.start(prompt_ids, features)  # type: ignore[attr-defined]

    def commit(self, committed: list[int], features: torch.Tensor | None) -> None:
        self.inner.commit(committed, features)  # type: ignore[attr-defined]

    def propose(
        self, context: list[int], k: int, params: SamplingParams, generator: object
    ) -> Proposal:
        proposal: Proposal = self.inner.propose(context, k, params, generator)  # type: ignore[attr-defined]
        cut = proposal.q is not None and len(proposal.tokens) > 1
        if cut and float(proposal.q[1, proposal.tokens[1]]) < 0.45:  # type: ignore[index]
            return Proposal(tokens=proposal.tokens[:1], q=proposal.q[:1])  # type: ignore[index]
        return proposal


def test_the_bound_catches_a_stop_that_reads_the_draw(target: TargetModel) -> None:
    """EAGLE-3 only: in this 3-token setting only the first cycle drafts two tokens, and a
    DFlash block's second slot does not depend on the first draw, so the skew such a stop gives
    DFlash here is too small for 2,400 samples to show (p 0.008 to 0.5, measured)."""
    drafter = random_drafter(target, "eagle3")
    params = SETTINGS["t1"]
    counts = draw(target, params, lambda: StopOnDrawnToken(drafter.proposer()))  # type: ignore[operator]
    assert chi_square_p(counts, exact_distribution(target, params)) < P_VALUE_FLOOR


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lookup_first_sampling_matches_target(
    target: TargetModel, drafter: torch.nn.Module, setting: str
) -> None:
    """n-gram lookup (one-hot q) where the context repeats, the drafter's sampled q elsewhere:
    each cycle is exact, so the continuation's distribution is the target's."""
    params = SETTINGS[setting]
    made: list[LookupFirstProposer] = []

    def make() -> LookupFirstProposer:
        # unigram matches: the first cycle (last token 2 is new) drafts, later ones mostly look up
        lookup = NgramProposer(max_ngram=2, min_ngram=1)
        proposer = LookupFirstProposer(
            drafter.proposer(),  # type: ignore[operator]
            lookup_tokens=2,
            drafter_tokens=2,
            lookup=lookup,
        )
        made.append(proposer)
        return proposer

    counts = draw(target, params, make)
    assert chi_square_p(counts, exact_distribution(target, params)) > P_VALUE_FLOOR
    assert sum(p.lookup_cycles for p in made) > SAMPLES // 10  # both sides really drafted
    assert sum(p.drafter_cycles for p in made) > SAMPLES // 10


@pytest.mark.parametrize("argmax_drafting", [False, True], ids=["q-sampling", "argmax"])
def test_bound_catches_injected_residual_bug(
    target: TargetModel,
    drafter: torch.nn.Module,
    argmax_drafting: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "verify_sampling", buggy_verify_sampling)
    params = SETTINGS["t1"]
    counts = draw(target, params, lambda: drafter.proposer(argmax_drafting=argmax_drafting))  # type: ignore[arg-type]
    assert chi_square_p(counts, exact_distribution(target, params)) < P_VALUE_FLOOR


def test_drafter_q_really_differs_from_p(target: TargetModel, drafter: torch.nn.Module) -> None:
    """Guard against a vacuous pass: with q == p every draft is accepted and no bug shows."""
    params = SETTINGS["t1"]
    engine = DecodeEngine(target, num_draft_tokens=2)
    stats = [
        engine.generate(
            PROMPT,
            replace(params, seed=s),
            proposer=drafter.proposer(),
            decode_text=False,  # type: ignore[arg-type]
        ).stats
        for s in range(200)
    ]
    accepted = sum(s.accepted_tokens for s in stats)
    proposed = sum(s.draft_tokens for s in stats)
    assert 0.2 < accepted / proposed < 0.9


def buggy_verify_tree_sampling(
    tokens: list[int],
    layout: TreeLayout,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    """The injected tree bug: each child is tried against p itself (not the residual left by
    its rejected siblings), and the bonus is drawn from p."""
    path: list[int] = []
    node = 0
    while True:
        accepted = None
        for child in layout.children[node]:
            if float(torch.rand((), generator=generator)) < float(p[node, tokens[child]]):
                accepted = child
                break
        if accepted is None:
            bonus = int(torch.multinomial(p[node], 1, generator=generator))
            return TreeVerdict(path=path, bonus=bonus)
        path.append(accepted)
        node = accepted


@pytest.mark.parametrize("tree", [DraftTree(2, 4), DraftTree(2, 4, min_prob=0.3)], ids=str)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_tree_sampling_matches_target(target: TargetModel, setting: str, tree: DraftTree) -> None:
    """EAGLE-3 tree drafts (2 children per node, deterministic candidates; with and without a
    probability floor) keep the target's distribution, with trees that are really accepted
    and rejected."""
    drafter = random_drafter(target, "eagle3")
    params = SETTINGS[setting]
    stats: list[DecodeStats] = []

    def make() -> object:
        return drafter.proposer(tree=tree)  # type: ignore[operator]

    engine = DecodeEngine(target, num_draft_tokens=2)
    for seed in range(200):
        out = engine.generate(PROMPT, replace(params, seed=seed), proposer=make())  # type: ignore[arg-type]
        stats.append(out.stats)
    accepted = [s.accepted_by_position[0] for s in stats if s.accepted_by_position]
    assert 0 < sum(accepted) < sum(s.tree_cycles for s in stats)
    counts = draw(target, params, make)
    assert chi_square_p(counts, exact_distribution(target, params)) > P_VALUE_FLOOR


def test_bound_catches_an_injected_tree_bug(
    target: TargetModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "verify_tree_sampling", buggy_verify_tree_sampling)
    drafter = random_drafter(target, "eagle3")
    params = SETTINGS["t1"]
    counts = draw(target, params, lambda: drafter.proposer(tree=DraftTree(branch=2, nodes=4)))  # type: ignore[operator]
    assert chi_square_p(counts, exact_distribution(target, params)) < P_VALUE_FLOOR
