"""wire.formats: the one parser of each small format."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest

from draftopd.wire.formats import (
    FINISHED_STATUSES,
    JOB_STATUSES,
    RegistryRef,
    is_pickle_name,
    parse_random_ref,
    parse_registry_ref,
)


def test_registry_refs() -> None:
    ref = parse_registry_ref("registry://smollm2-eagle3/12")
    assert ref == RegistryRef("smollm2-eagle3", 12) and str(ref) == "registry://smollm2-eagle3/12"
    assert parse_registry_ref("/checkpoints/step-3") is None
    assert parse_registry_ref("runs/registry/v1") is None
    for bad in ("registry://", "registry://name", "registry://name/x", "registry://a/b/3"):
        with pytest.raises(ValueError, match="expected 'registry://NAME/VERSION'"):
            parse_registry_ref(bad)


def test_random_refs() -> None:
    assert parse_random_ref("random:0") == 0 and parse_random_ref("random:17") == 17
    assert parse_random_ref("runs/x") is None and parse_random_ref("randomly") is None
    for bad in ("random:", "random:x", "random:-1", "random:1.5"):
        with pytest.raises(ValueError, match="random:SEED"):
            parse_random_ref(bad)


def test_pickle_names() -> None:
    assert is_pickle_name("weights.PT") and is_pickle_name("a/b/model.bin")
    assert not is_pickle_name("model.safetensors") and not is_pickle_name("config.json")


def test_job_statuses_match_the_registry_schema() -> None:
    from services.registry.schemas import JobStatus

    assert get_args(JobStatus) == JOB_STATUSES
    assert set(JOB_STATUSES) > FINISHED_STATUSES and "queued" not in FINISHED_STATUSES


def test_the_wire_package_is_torch_free() -> None:
    """The registry and light clients import these modules, and the CLI builds every flag,
    without loading torch."""
    code = (
        "import sys, draftopd.wire.formats, draftopd.wire.job_specs, "
        "draftopd.wire.registry_client, draftopd.wire.rollout_queue, "
        "draftopd.training.configs, draftopd.bench_config, draftopd.cli.app; "
        "draftopd.cli.app.build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
