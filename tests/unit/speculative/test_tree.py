"""Tree drafts (``speculative/tree.py``, ``models/eagle3/tree.py``): the layout, the target's tree
forward and cache compaction against plain causal forwards, the EAGLE-3 tree against a tree
rebuilt from chain drafting, and greedy losslessness. The sampling distribution with trees is in
test_lossless_sampling.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from draftopd.models.eagle3.tree import Eagle3TreeProposer
from draftopd.models.families import family
from draftopd.models.lean_llama import visibility_mask
from draftopd.speculative.engine import DecodeEngine, DecodeStats
from draftopd.speculative.proposers import LookupFirstProposer
from draftopd.speculative.sampling import SamplingParams
from draftopd.speculative.tree import DraftTree, TreeLayout, verify_tree_greedy

# a root with two children; the first child has two children, one of which has a child
PARENTS = (-1, 0, 0, 1, 1, 3)


def _ids(target: Any, text: str) -> list[int]:
    return list(target.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_layout_depths_children_and_mask() -> None:
    layout = TreeLayout(PARENTS)
    assert layout.depths == [0, 1, 1, 2, 2, 3]
    assert layout.children == [[1, 2], [3, 4], [], [5], [], []]
    visible = layout.visibility(3)
    assert visible.shape == (6, 9)
    sees = visible.tolist()
    assert all(row[:3] == [True] * 3 for row in sees)  # every entry sees the prefix
    assert [i for i, s in enumerate(sees[5][3:]) if s] == [0, 1, 3, 5]  # root, 1, 3, itself
    assert [i for i, s in enumerate(sees[2][3:]) if s] == [0, 2]
    mask = visibility_mask(visible, group=2, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (12, 9) and torch.equal(mask[:6] == 0, visible)
    assert torch.equal(mask[6:], mask[:6])  # repeated for the folded query heads
    assert layout.positions(3).tolist() == [3, 4, 4, 5, 5, 6]
    assert TreeLayout.from_proposal((-1, -1, 0, 0, 2)).parents == PARENTS


@pytest.mark.parametrize("parents", [(), (0,), (-1, 1), (-1, 0, 3)])
def test_layout_rejects_what_is_not_a_tree(parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"root|parent"):
        TreeLayout(parents)


def test_draft_tree_parse() -> None:
    assert DraftTree.parse("3x10") == DraftTree(branch=3, nodes=10)
    assert DraftTree.parse("3x10:0.05") == DraftTree(branch=3, nodes=10, min_prob=0.05)
    assert str(DraftTree(4, 16)) == "4x16" and str(DraftTree(4, 16, 0.1)) == "4x16:0.1"
    for bad in ("3", "3,10", "3xx", "0x4", "3x0", "1x2x3", "-1x4", "3x10:1", "3x10:x", "3x4:"):
        with pytest.raises(ValueError, match="draft tree"):
            DraftTree.parse(bad)


def test_greedy_tree_verification_walks_the_argmax_path() -> None:
    layout = TreeLayout(PARENTS)
    tokens = [9, 4, 5, 6, 7, 8]
    argmax = [5, 0, 0, 0, 0, 0]  # root -> 5 (entry 2, a leaf), then bonus argmax at entry 2
    argmax[2] = 3
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 10).float()
    verdict = verify_tree_greedy(tokens, layout, logits)
    assert (verdict.path, verdict.bonus) == ([2], 3)
    argmax = [4, 6, 0, 8, 0, 1]  # root -> 4 -> 6 -> 8, then bonus 1
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 10).float()
    verdict = verify_tree_greedy(tokens, layout, logits)
    assert (verdict.path, verdict.bonus, verdict.accepted) == ([1, 3, 5], 1, 3)
    argmax = [2, 0, 0, 0, 0, 0]  # no child matches: nothing accepted
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 10).float()
    assert verify_tree_greedy(tokens, layout, logits).path == []


def test_tree_forward_and_keep_equal_causal_forwards(tiny_target: Any) -> None:
    """Each node's logits equal a causal forward of its root-to-node path, and after keeping a
    path the cache decodes on exactly as if that path had been fed as a chain."""
    prompt = _ids(tiny_target, "Beautiful is better than ugly.")
    layout = TreeLayout(PARENTS)
    tokens = [prompt[-1], 11, 12, 13, 14, 15]
    cache = tiny_target.new_decode_cache()
    tiny_target.forward(torch.tensor([prompt[:-1]]), cache)
    start = cache.length
    tree_logits = tiny_target.forward(torch.tensor([tokens]), cache, tree=layout).logits[0]
    for node in range(len(tokens)):
        path = [node]
        while layout.parents[path[-1]] >= 0:
            path.append(layout.parents[path[-1]])
        chain = [tokens[i] for i in reversed(path)]
        ref = tiny_target.forward(torch.tensor([prompt[:-1] + chain])).logits[0, -1]
        torch.testing.assert_close(tree_logits[node], ref, atol=1e-4, rtol=1e-4)
    cache.keep(start, [0, 1, 3, 5])  # root -> 11 -> 13 -> 15
    kept = [prompt[-1], 11, 13, 15]
    nxt = tiny_target.forward(torch.tensor([[7, 8]]), cache).logits[0]
    ref = tiny_target.forward(torch.tensor([prompt[:-1] + kept + [7, 8]])).logits[0, -2:]
    torch.testing.assert_close(nxt, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="keep"):
        cache.keep(start, list(range(50)))


def test_the_hf_step_refuses_a_tree(tiny_target: Any) -> None:
    cache = tiny_target.new_decode_cache(step="hf")
    with pytest.raises(ValueError, match="lean"):
        tiny_target.forward(torch.tensor([[1, 2, 3]]), cache, tree=TreeLayout((-1, 0, 0)))


@pytest.fixture(scope="module")
def sharp_drafter(tiny_target: Any) -> Any:
    """A random EAGLE-3 drafter with large weights: its attention is far from uniform, so a
    wrong tree mask or position moves its logits well beyond the tolerance below."""
    kind = family("eagle3")
    cfg = kind.config_for_target(
        tiny_target.config,
        feature_layers=tiny_target.feature_layers,
        draft_vocab_size=tiny_target.vocab_size - 20,
    )
    drafter = kind.random(cfg, seed=3, std=0.3)
    drafter.attach_embedding(tiny_target.embed_tokens)
    return drafter.eval()


class RecordingTree(Eagle3TreeProposer):
    """Keeps the draft log-probabilities each expanded node's children were chosen from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expanded: list[tuple[list[int], torch.Tensor]] = []  # (tokens to node, logp)

    def _expand(self, nodes: Any, parents: list[int], logits: torch.Tensor, *, depth: int) -> None:
        for row, parent in enumerate(parents):
            path = []
            while parent >= 0:
                path.append(nodes.tokens[parent])
                parent = nodes.parents[parent]
            self.expanded.append((path[::-1], torch.log_softmax(logits[row].float(), dim=-1)))
        super()._expand(nodes, parents, logits, depth=depth)


def _chain_logp(drafter: Any, prompt: list[int], features: torch.Tensor, path: list[int]) -> Any:
    """The drafter's log-probabilities after ``path``, from a fresh chain drafter fed the path
    one token at a time (its causal cache: no tree mask, no shared levels)."""
    chain = drafter.proposer(weights="float32")
    step = chain._forward(chain._project(features), prompt[1:], 0)
    for index, token in enumerate(path):
        step = chain._forward(step.hidden[-1:], [token], len(prompt) - 1 + index)
    return torch.log_softmax(step.logits.float(), dim=-1)


@pytest.mark.parametrize("shape", [(1, 4), (2, 6), (3, 12)])
def test_eagle3_tree_levels_equal_chain_drafting(
    tiny_target: Any, sharp_drafter: Any, shape: tuple[int, int]
) -> None:
    """Every expanded node's distribution equals chain drafting along its path; the proposal
    holds the best nodes by cumulative log-probability, parents first."""
    tree, k = DraftTree(*shape), 4
    prompt = _ids(tiny_target, "Speculative decoding lets a small draft model")
    cache = tiny_target.new_decode_cache()
    features = tiny_target.forward(torch.tensor([prompt[:-1]]), cache, want_features=True).features[
        0
    ]
    proposer = RecordingTree(sharp_drafter, tree=tree, weights="float32")
    proposer.start(prompt, features)
    got = proposer.propose(prompt, k, SamplingParams(max_new_tokens=32), None)
    assert len(proposer.expanded) == 1 + tree.branch * (k - 1)
    scores: dict[tuple[int, ...], float] = {(): 0.0}
    for path, logp in proposer.expanded:
        want = _chain_logp(sharp_drafter, prompt, features, path)
        torch.testing.assert_close(logp, want, atol=1e-4, rtol=1e-4)
        top = torch.topk(want, tree.branch)
        for index, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            scores[(*path, int(sharp_drafter.d2t[index]))] = scores[tuple(path)] + value
    assert got.parents is not None
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(got.tokens, got.parents, strict=True):
        assert parent < len(paths)
        paths.append((*(paths[parent] if parent >= 0 else ()), token))
    del scores[()]
    best = sorted(scores.values(), reverse=True)[: tree.nodes]
    assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-4)
    if shape[0] == 1:  # a one-branch tree is the chain
        chain = sharp_drafter.proposer(weights="float32")
        chain.start(prompt, features)
        assert chain.propose(prompt, k, SamplingParams(max_new_tokens=32), None).tokens == (
            got.tokens
        )


def test_tree_and_chain_options_that_do_not_combine(tiny_drafter: Any, tiny_dflash: Any) -> None:
    with pytest.raises(ValueError, match="stop_below"):
        tiny_drafter.proposer(tree=DraftTree(2, 4), stop_below=0.3)
    with pytest.raises(ValueError, match="lean"):
        tiny_drafter.proposer(tree=DraftTree(2, 4), weights="module")
    with pytest.raises(ValueError, match="tree"):
        tiny_dflash.proposer(tree=DraftTree(2, 4))


@pytest.mark.parametrize("k", [1, 4, 6])
@pytest.mark.parametrize("shape", [(1, 4), (3, 10), (4, 16)])
def test_tree_greedy_equals_plain_greedy(
    tiny_target: Any, tiny_drafter: Any, k: int, shape: tuple[int, int]
) -> None:
    engine = DecodeEngine(tiny_target, num_draft_tokens=k)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for text in ["Speculative decoding lets a small draft model", "def add(a, b):", "x"]:
        ids = _ids(tiny_target, text)
        plain = engine.generate(ids, params)
        spec = engine.generate(ids, params, proposer=tiny_drafter.proposer(tree=DraftTree(*shape)))
        assert spec.token_ids == plain.token_ids, (k, shape, text)
        assert spec.stats.committed == 40
        assert 0 < spec.stats.tree_cycles <= spec.stats.cycles
        with pytest.raises(ValueError, match="chain"):
            engine.generate(ids, params, proposer=tiny_drafter.proposer(tree=DraftTree(2, 3)),
                            record=True)  # fmt: skip


def test_a_tree_accepts_more_than_the_chain_on_a_trained_drafter(
    sharp_target: Any, half_trained_drafter: Any, corpus: Any
) -> None:
    """The point of the tree: with the same drafter and depth, more tokens per cycle. Greedy
    output stays plain decoding's (with n-gram lookup first too)."""
    engine = DecodeEngine(sharp_target, num_draft_tokens=3)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    committed = {"chain": 0, "tree": 0}
    cycles = {"chain": 0, "tree": 0}
    for prompt in corpus[1]:
        plain = engine.generate(prompt, params, decode_text=False)
        makers = {
            "chain": lambda: half_trained_drafter.proposer(),
            "tree": lambda: half_trained_drafter.proposer(tree=DraftTree(3, 9)),
        }
        for name, make in makers.items():
            out = engine.generate(prompt, params, proposer=make(), decode_text=False)
            assert out.token_ids == plain.token_ids, name
            committed[name] += out.stats.committed
            cycles[name] += out.stats.cycles
        both = LookupFirstProposer(
            half_trained_drafter.proposer(tree=DraftTree(3, 9)), lookup_tokens=4, drafter_tokens=3
        )
        out = engine.generate(prompt, params, proposer=both, decode_text=False)
        assert out.token_ids == plain.token_ids
    tau = {name: committed[name] / cycles[name] for name in committed}
    assert tau["tree"] > tau["chain"] + 0.1, tau


def _paths(proposal: Any) -> list[tuple[int, ...]]:
    """Each drafted node as its token path from the root."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(proposal.tokens, proposal.parents, strict=True):
        paths.append((*(paths[parent] if parent >= 0 else ()), token))
    return paths


def test_a_min_prob_tree_keeps_exactly_the_likely_nodes(
    tiny_target: Any, sharp_drafter: Any
) -> None:
    """With min_prob, the tree is the unfloored tree's nodes whose path probability reaches the
    floor (and always the best first node); drafting stops where no node is left."""
    prompt = _ids(tiny_target, "def add(a, b):")
    features = tiny_target.forward(
        torch.tensor([prompt[:-1]]), tiny_target.new_decode_cache(), want_features=True
    ).features[0]
    params, k = SamplingParams(max_new_tokens=32), 4
    full = RecordingTree(sharp_drafter, tree=DraftTree(3, 200), weights="float32")
    full.start(prompt, features)
    everything = _paths(full.propose(prompt, k, params, None))
    scores: dict[tuple[int, ...], float] = {(): 0.0}
    for path, logp in full.expanded:
        top = torch.topk(logp, 3)
        for index, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            scores[(*path, int(sharp_drafter.d2t[index]))] = scores[tuple(path)] + value
    probs = sorted(math.exp(scores[p]) for p in everything)
    for floor in (probs[len(probs) // 2], probs[-2], 0.999):
        floored = RecordingTree(sharp_drafter, tree=DraftTree(3, 200, floor), weights="float32")
        floored.start(prompt, features)
        kept = _paths(floored.propose(prompt, k, params, None))
        want = [p for p in everything if math.exp(scores[p]) >= floor] or [everything[0]]
        assert kept == want, floor
        assert len(floored.expanded) <= len(full.expanded)
    assert len(kept) == 1 and len(floored.expanded) == 1  # only the best first node: no levels


def test_decode_stats_count_trees_and_lookup_cycles_apart() -> None:
    stats = DecodeStats()
    stats.add(3, 2, lookup=True)  # a lookup chain: 3 drafts, 2 accepted
    stats.add(2, 1, nodes=5)  # a tree of depth 2 with 5 nodes, path of 1
    stats.add(2, 0)  # a drafter chain
    assert (stats.cycles, stats.committed, stats.lookup_cycles, stats.lookup_committed) == (
        3, 6, 1, 3,
    )  # fmt: skip
    assert (stats.tree_cycles, stats.draft_tokens, stats.accepted_tokens) == (1, 10, 3)
    assert stats.accepted_by_position == [2, 1, 0] and stats.proposed_by_position == [3, 3, 1]
