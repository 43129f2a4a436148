"""The Draft-OPD loop in one process: on-policy at every step, versions advance, resume is exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from draftopd.models.drafter import Drafter
from draftopd.models.target import TargetModel
from draftopd.training.data.regenerate import Sample
from draftopd.training.opd.rollouts import fresh_records, make_rollouts
from draftopd.training.opd.train import TEXTS_FILE, LocalRollouts, OPDConfig, OPDLearner, train_opd
from draftopd.training.run import latest_checkpoint


def _cfg(**changes: object) -> OPDConfig:
    base = {
        "lr": 3e-3,
        "total_steps": 6,
        "prompts_per_step": 3,
        "num_draft_tokens": 4,
        "max_new_tokens": 24,
        "eval_every": 3,
        "eval_num_draft_tokens": 4,
        "eval_max_new_tokens": 24,
        "checkpoint_every": 3,
    }
    return OPDConfig.from_dict({**base, **changes})


def _prompts(corpus: tuple[list[Sample], list[list[int]]]) -> list[list[int]]:
    return [list(s.prompt_ids) for s in corpus[0][:12]]


def test_learner_update_lowers_the_replay_loss_of_its_records(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
) -> None:
    learner = OPDLearner(sharp_target, copy.deepcopy(half_trained_drafter), _cfg(lr=3e-3))
    records = make_rollouts(
        sharp_target, learner.drafter, _prompts(corpus)[:4], num_draft_tokens=4, max_new_tokens=24
    )
    losses = [learner.update(records)["loss"]]
    for _ in range(4):  # versions advance: these records are 1 step old, so allow the lag
        learner.cfg = _cfg(max_version_lag=10)
        losses.append(learner.update(records)["loss"])
    assert learner.step == 5
    assert losses[-1] < losses[0] - 0.1, losses


def test_records_older_than_the_allowed_lag_are_dropped(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
) -> None:
    drafter = copy.deepcopy(half_trained_drafter)
    prompts = _prompts(corpus)[:2]
    old = make_rollouts(sharp_target, drafter, prompts, num_draft_tokens=4, max_new_tokens=16)
    assert [r.drafter_version for r in old] == ["0", "0"]
    assert fresh_records(old, current_version=1, max_lag=0) == []
    assert len(fresh_records(old, current_version=1, max_lag=1)) == 2
    learner = OPDLearner(sharp_target, drafter, _cfg())
    learner.step = 1
    with pytest.raises(ValueError, match="version lag 0"):
        learner.update(old)
    new = make_rollouts(
        sharp_target, drafter, prompts, num_draft_tokens=4, max_new_tokens=16, drafter_version="1"
    )
    stats = learner.update(old + new)
    assert stats["records"] == 2 and stats["dropped_records"] == 2


def test_train_opd_is_on_policy_every_step_and_resumes_exactly(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
    tmp_path: Path,
) -> None:
    prompts, heldout = _prompts(corpus), corpus[1][:3]
    cfg = _cfg()
    straight = train_opd(
        sharp_target,
        copy.deepcopy(half_trained_drafter),
        prompts,
        tmp_path / "a",
        cfg,
        eval_prompts=heldout,
        progress=False,
    )
    lines = straight.history
    assert [x["step"] for x in lines] == list(range(7))
    assert [x["step"] for x in lines if x["tau"] is not None] == [0, 3, 6]
    for line in lines[1:]:
        # rollouts at version v are replayed at version v: the replay is on-policy
        assert line["parity_accepted"] in (None, 1.0) or line["parity_accepted"] >= 0.99
        assert line["parity_rejected"] >= 0.99, line
        assert line["slots_a"] > 0 and line["slots_b"] > 0 and line["dropped_records"] == 0
        assert line["rollout_tokens"] == 3 * 24
        for key in ("rollout_s", "target_s", "replay_s", "optimizer_s"):
            assert line[key] > 0
    assert {p.name for p in straight.checkpoint.iterdir()} == {
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"
    }  # fmt: skip

    class Killed(Exception):
        pass

    def kill_at_5(line: dict[str, object]) -> None:
        if line["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train_opd(
            sharp_target,
            copy.deepcopy(half_trained_drafter),
            prompts,
            tmp_path / "b",
            cfg,
            progress=False,
            on_step=kill_at_5,
        )
    partial = latest_checkpoint(tmp_path / "b")
    assert partial is not None and partial.name == "step-00000003"
    resumed = train_opd(
        sharp_target, copy.deepcopy(half_trained_drafter), prompts, tmp_path / "b", cfg,
        progress=False,
    )  # fmt: skip
    assert [x["step"] for x in resumed.history] == [4, 5, 6]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))
    assert [x["loss"] for x in resumed.history] == [x["loss"] for x in lines[4:]]
    for (name, a), (_, b) in zip(
        straight.drafter.state_dict().items(), resumed.drafter.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="lr"):
        train_opd(
            sharp_target, half_trained_drafter, prompts, tmp_path / "b", _cfg(lr=1e-4),
            progress=False,
        )  # fmt: skip


def test_batched_rollouts_on_greedy_texts_written_once_train_the_same(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
    tmp_path: Path,
) -> None:
    """Greedy text does not depend on the drafter: the batched mode writes every prompt's text
    once (kept in rollout_texts.jsonl) and rolls out each step with the current drafter on it.
    The run equals one that decodes every step's prompts afresh, and a resumed run reads the
    texts back instead of writing them again."""
    prompts = _prompts(corpus)
    cfg = _cfg(rollout_mode="batched", rollout_batch_size=2, checkpoint_every=2)
    fresh = train_opd(
        sharp_target, copy.deepcopy(half_trained_drafter), prompts, tmp_path / "fresh", cfg,
        progress=False, rollouts=LocalRollouts(sharp_target, cfg),
    )  # fmt: skip
    shared = train_opd(
        sharp_target, copy.deepcopy(half_trained_drafter), prompts, tmp_path / "shared", cfg,
        progress=False,
    )  # fmt: skip
    keys = ("loss", "rollout_tau", "rollout_tokens", "slots_a", "slots_b", "parity_rejected")
    assert [[x.get(k) for k in keys] for x in shared.history] == [
        [x.get(k) for k in keys] for x in fresh.history
    ]
    texts = (tmp_path / "shared" / TEXTS_FILE).read_text().splitlines()
    assert len(texts) == len(prompts) and not (tmp_path / "fresh" / TEXTS_FILE).exists()
    source = LocalRollouts(sharp_target, cfg, prompts=prompts, out_dir=tmp_path / "shared")
    again = source.greedy_texts(prompts[:3])
    assert len((tmp_path / "shared" / TEXTS_FILE).read_text().splitlines()) == len(prompts)
    assert [len(t) for t in again] == [cfg.max_new_tokens] * 3
    with pytest.raises(ValueError, match="batched greedy"):
        make_rollouts(sharp_target, half_trained_drafter, prompts[:1], num_draft_tokens=2,
                      max_new_tokens=4, texts=again[:1])  # fmt: skip


def test_the_learner_replays_from_the_rollouts_text_pass(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
) -> None:
    """Batched rollouts keep their text pass (features and logits of each record's text); the
    learner replays from it instead of running the target again, and gets the same loss,
    gradients and parity. Records whose text is not kept fall back to the learner's own pass."""
    prompts = _prompts(corpus)[:4]
    kwargs = {"num_draft_tokens": 4, "max_new_tokens": 24, "mode": "batched", "batch_size": 3}
    outputs: dict = {}
    records = make_rollouts(
        sharp_target, half_trained_drafter, prompts, target_outputs=outputs, **kwargs
    )
    assert len(outputs) == len(records)
    results = []
    for shared in (outputs, None):
        learner = OPDLearner(sharp_target, copy.deepcopy(half_trained_drafter), _cfg(lr=1e-3))
        stats = learner.update(records, target_outputs=shared)
        weights = torch.cat([p.detach().flatten() for p in learner.drafter.parameters()])
        results.append((stats, weights))
    (with_shared, after_shared), (own, after_own) = results
    assert with_shared["target_shared"] and not own["target_shared"]
    for key in ("loss", "loss_a", "loss_b", "parity_accepted", "parity_rejected", "grad_norm"):
        assert with_shared[key] == pytest.approx(own[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(after_shared, after_own, rtol=1e-5, atol=1e-6)
    partial = {key: value for key, value in list(outputs.items())[:2]}  # two texts missing
    learner = OPDLearner(sharp_target, copy.deepcopy(half_trained_drafter), _cfg())
    assert not learner.update(records, target_outputs=partial)["target_shared"]
    with pytest.raises(ValueError, match="batched greedy"):
        make_rollouts(sharp_target, half_trained_drafter, prompts[:1], num_draft_tokens=2,
                      max_new_tokens=4, target_outputs={})  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [{"random_anchors": True}, {"lambda_b": 0.0}, {"stream_b_loss": "bernoulli_fkl"}],
)
def test_ablations_run(
    sharp_target: TargetModel,
    half_trained_drafter: Drafter,
    corpus: tuple[list[Sample], list[list[int]]],
    changes: dict[str, object],
) -> None:
    learner = OPDLearner(sharp_target, copy.deepcopy(half_trained_drafter), _cfg(**changes))
    records = make_rollouts(
        sharp_target, learner.drafter, _prompts(corpus)[:3], num_draft_tokens=4, max_new_tokens=24
    )
    stats = learner.update(records)
    assert stats["loss"] > 0 and stats["grad_norm"] > 0
    if changes.get("random_anchors"):
        assert stats["slots_b"] == 0 and stats["slots_a"] > 0  # teacher-forced blocks only
