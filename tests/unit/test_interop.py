"""Export to the speculators (vLLM) and SGLang layouts, and import back: exact round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftopd.cli import main
from draftopd.interop import detect_format, export_drafter, import_drafter, server_layer_ids
from draftopd.models.checkpoint import load_drafter, random_drafter_for, save_drafter
from draftopd.models.target import TargetModel
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams


@pytest.fixture(scope="module")
def shuffled(tiny_target: TargetModel) -> Any:
    """A drafter whose draft vocabulary is a scattered subset of the target's, in shuffled order
    (so d2t offsets are all different and negative ones occur)."""
    drafter = random_drafter_for(tiny_target, seed=3, draft_vocab_size=200)
    ids = torch.randperm(tiny_target.vocab_size, generator=torch.Generator().manual_seed(0))[:200]
    drafter.set_draft_vocab(ids)
    return drafter


def _export(drafter: Any, target: TargetModel, out: Path, fmt: str) -> Path:
    return export_drafter(
        drafter, out, fmt=fmt, verifier="tiny", verifier_config=target.config.to_dict()
    )


def _cycles(target: TargetModel, drafter: Any, prompts: list[list[int]]) -> list[Any]:
    engine = DecodeEngine(target, num_draft_tokens=3)
    params = SamplingParams(max_new_tokens=24)
    return [
        engine.generate(p, params, proposer=drafter.proposer(), record=True).cycles for p in prompts
    ]


@pytest.mark.parametrize("fmt", ["speculators", "sglang"])
def test_export_then_import_gives_the_same_drafter(
    tiny_target: TargetModel, shuffled: Any, tmp_path: Path, fmt: str
) -> None:
    out = _export(shuffled, tiny_target, tmp_path / fmt, fmt)
    assert detect_format(out) == fmt
    tensors = load_file(str(out / "model.safetensors"))
    offsets = tensors["d2t"]
    assert torch.equal(offsets + torch.arange(200), shuffled.d2t)  # offsets map back exactly
    assert int(tensors["t2d"].sum()) == 200 and tensors["t2d"].dtype == torch.bool
    assert bool(tensors["t2d"][shuffled.d2t].all())
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    assert (
        f"{layer}self_attn.q_proj.weight" in tensors and f"{layer}mlp.down_proj.weight" in tensors
    )
    assert "embed_tokens.weight" not in tensors
    back = import_drafter(out, tiny_target)
    mine, theirs = shuffled.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    prompts = [[5 + i, 40, 7 * i + 3, 9] for i in range(20)]
    assert _cycles(tiny_target, back, prompts) == _cycles(tiny_target, shuffled, prompts)


def test_the_configs_name_what_the_servers_read(
    tiny_target: TargetModel, shuffled: Any, tmp_path: Path
) -> None:
    spec = json.loads((_export(shuffled, tiny_target, tmp_path / "s", "speculators") /
                       "config.json").read_text())  # fmt: skip
    assert spec["speculators_model_type"] == "eagle3"
    assert spec["draft_vocab_size"] == 200
    assert spec["transformer_layer_config"]["num_hidden_layers"] == 1
    assert spec["speculators_config"]["verifier"]["name_or_path"] == "tiny"
    assert spec["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    # the hidden state entering layer i + 1 is the output of our feature layer i
    assert spec["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in shuffled.cfg.feature_layers]
    assert server_layer_ids((2, 15, 27)) == [3, 16, 28]
    sgl = json.loads((_export(shuffled, tiny_target, tmp_path / "g", "sglang") /
                      "config.json").read_text())  # fmt: skip
    assert sgl["architectures"] == ["LlamaForCausalLMEagle3"] and sgl["draft_vocab_size"] == 200
    assert (
        sgl["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        == spec["eagle_aux_hidden_state_layer_ids"]
    )


def test_bad_directories_are_refused(
    tiny_target: TargetModel, tiny_dflash: Any, shuffled: Any, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="EAGLE-3"):
        _export(tiny_dflash, tiny_target, tmp_path / "d", "speculators")
    with pytest.raises(ValueError, match="format"):
        _export(shuffled, tiny_target, tmp_path / "x", "onnx")
    ours = save_drafter(shuffled, tmp_path / "ours")
    with pytest.raises(ValueError, match="layout"):
        import_drafter(ours, tiny_target)  # a draftopd checkpoint is not an export
    out = _export(shuffled, tiny_target, tmp_path / "t2d", "speculators")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["t2d"][int(torch.nonzero(~tensors["t2d"])[0])] = True
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="t2d"):
        import_drafter(out, tiny_target)
    out = _export(shuffled, tiny_target, tmp_path / "shape", "sglang")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_size": 4096}))
    with pytest.raises(ValueError, match="another target"):
        import_drafter(out, tiny_target)


def test_cli_export_and_import_to_a_checkpoint(
    tiny_target: TargetModel, tiny_target_dir: Path, shuffled: Any, tmp_path: Path
) -> None:
    source = save_drafter(shuffled, tmp_path / "source")
    target = ["--target", str(tiny_target_dir)]
    out = tmp_path / "exported"
    assert main(["export", str(source), "--format", "speculators", "--out", str(out), *target]) == 0
    assert main(["import", str(out), "--out", str(tmp_path / "back"), *target]) == 0
    back = load_drafter(tmp_path / "back", tiny_target)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in shuffled.state_dict().items())
    random_out = tmp_path / "random"
    assert (
        main(["export", "random:0:100", "--format", "sglang", "--out", str(random_out), *target])
        == 0
    )
    assert json.loads((random_out / "config.json").read_text())["draft_vocab_size"] == 100
    with pytest.raises(SystemExit) as refused:
        main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), *target])
    assert refused.value.code == 2


def test_import_into_the_registry_and_export_from_it(
    redis_url: str, tiny_target: TargetModel, tiny_target_dir: Path, shuffled: Any, tmp_path: Path
) -> None:
    from tests.services.registry.helpers import TOKEN, live_registry

    exported = _export(shuffled, tiny_target, tmp_path / "exported", "sglang")
    target = ["--target", str(tiny_target_dir)]
    with live_registry(redis_url, tmp_path, "other") as client:
        url = str(client.http.base_url)
        registry = ["--registry-url", url, "--token", TOKEN]
        assert main(["import", str(exported), "--drafter", "imported", *registry, *target]) == 0
        assert main(["import", str(exported), "--drafter", "imported", *registry, *target]) == 0
        versions = client.list_versions("imported")
        assert [v["version"] for v in versions] == [1, 2]
        again = tmp_path / "again"
        ref = "registry://imported/2"
        argv = ["export", ref, "--format", "speculators", "--out", str(again), *registry, *target]
        assert main(argv) == 0
        with pytest.raises(SystemExit) as refused:  # a write needs the token
            main(["import", str(exported), "--drafter", "x", "--registry-url", url,
                  "--token", "wrong", *target])  # fmt: skip
        assert refused.value.code == 2
    back = import_drafter(again, tiny_target)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in shuffled.state_dict().items())
