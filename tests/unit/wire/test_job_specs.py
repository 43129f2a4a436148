"""wire.job_specs: a run section plus a stage section, strict, with the earlier flat layout."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from draftopd.training.configs import OPDConfig, OPDLossConfig, RunConfig, SFTConfig
from draftopd.wire.job_specs import DraftOPDJobSpec, SFTJobSpec, parse_spec, total_steps


def test_sections_are_the_config_classes() -> None:
    spec = parse_spec(
        {"mode": "draft_opd", "run": {"out_dir": "runs/o", "heldout": 4},
         "opd": {"drafter": "registry://d/3", "total_steps": 7, "loss": {"lambda_b": 0.0}}}
    )  # fmt: skip
    assert isinstance(spec, DraftOPDJobSpec)
    assert spec.run == RunConfig(out_dir="runs/o", heldout=4)
    assert spec.opd.loss == OPDLossConfig(lambda_b=0.0) and total_steps(spec) == 7
    stored = spec.model_dump(mode="json")
    assert parse_spec(stored) == spec
    assert set(stored) == {"mode", "run", "opd"} and stored["opd"]["betas"] == [0.9, 0.95]


def test_the_flat_layout_of_earlier_releases_is_normalised() -> None:
    sft = parse_spec({"mode": "sft", "out_dir": "runs/s", "max_new_tokens": 64,
                      "sft": {"total_steps": 5}})  # fmt: skip
    assert isinstance(sft, SFTJobSpec)
    assert sft.run.out_dir == "runs/s" and sft.sft == SFTConfig(total_steps=5, max_new_tokens=64)
    flat = {"mode": "draft_opd", "out_dir": "runs/o", "drafter": "ck", "requests_per_step": 3}
    opd = parse_spec({**flat, "opd": {"lambda_b": 0.5, "total_steps": 2}})
    assert isinstance(opd, DraftOPDJobSpec)
    assert opd.opd == OPDConfig(drafter="ck", requests_per_step=3, total_steps=2,
                                loss=OPDLossConfig(lambda_b=0.5))  # fmt: skip


RUN = {"out_dir": "r"}


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"mode": "sft", "run": {"out_dir": "r", "tagret": "x"}}, "run.tagret"),
        (
            {"mode": "sft", "run": {"out_dir": "r"}, "sft": {"total_steps": "abc"}},
            "sft.total_steps",
        ),
        ({"mode": "sft", "run": {"out_dir": "r"}, "sft": {"total_steps": 2.5}}, "sft.total_steps"),
        ({"mode": "sft", "run": {"out_dir": "r"}, "sft": {"total_steps": 0}}, "total_steps"),
        ({"mode": "draft_opd", "run": {"out_dir": "r"}, "opd": {}}, "drafter"),
        (
            {
                "mode": "draft_opd",
                "run": {"out_dir": "r"},
                "opd": {"drafter": "c", "loss": {"gamma": 2}},
            },
            "gamma",
        ),
        ({"mode": "sft", "out_dir": "r", "steps": 3}, "steps"),
        (
            {"mode": "sft", "run": {"out_dir": "r", "prompts": "traffic://t?min_prompts=2"}},
            "draft_opd jobs only",
        ),
        (
            {
                "mode": "draft_opd",
                "run": {"out_dir": "r", "prompts": {"source": "traffic", "x": 1}},
                "opd": {"drafter": "c"},
            },
            "unknown keys",
        ),
    ],
)
def test_bad_specs_name_the_field(data: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        parse_spec(data)
