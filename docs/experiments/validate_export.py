"""Check `draftopd export` against the `speculators` package from PyPI (not in CI: it needs a
second set of packages). Issue 17; docs/interop.md.

    .venv/bin/pip install --no-deps --target /tmp/specpkgs speculators loguru pydantic-settings \
        python-dotenv datasets multiprocess pandas pyarrow dill xxhash hs-connectors
    PYTHONPATH=/tmp/specpkgs .venv/bin/python docs/experiments/validate_export.py [DRAFTER]

For both layouts it exports DRAFTER (default random:0; any reference the bench takes) for
SmolLM2 and has speculators read it:
- speculators layout: `Eagle3SpeculatorConfig` parses config.json and `Eagle3DraftModel`
  loads the weights (verifier: the local SmolLM2 directory);
- sglang layout: speculators' own `Eagle3Converter` converts it (midlayer.* -> layers.0.*) and
  validates the result by loading it.
Every tensor speculators loaded must equal ours, and its d2t/t2d must map to our draft vocabulary.
Prints one JSON line per check.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from draftopd.bench import load_drafter_ref
from draftopd.interop import export_drafter
from draftopd.models.target import load_target

PAIRS = {  # speculators' name -> ours
    "fc.weight": "fc.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{
        f"layers.0.{n}": n
        for n in (
            "input_layernorm.weight",
            "hidden_norm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        )
    },
    **{f"layers.0.mlp.{n}": n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")},
}


def compare(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, object]:
    equal = {k: torch.equal(theirs[k].float(), ours[v].float()) for k, v in PAIRS.items()}
    d2t = theirs["d2t"].long() + torch.arange(theirs["d2t"].numel())
    mask = torch.zeros(ours["t2d"].numel(), dtype=torch.bool)
    mask[ours["d2t"]] = True
    return {
        "tensors_equal": sum(equal.values()),
        "tensors": len(equal),
        "d2t_exact": bool(torch.equal(d2t, ours["d2t"])),
        "t2d_exact": bool(torch.equal(theirs["t2d"].bool(), mask)),
    }


def main() -> int:
    from speculators.convert.eagle.eagle3_converter import Eagle3Converter
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    ref = sys.argv[1] if len(sys.argv) > 1 else "random:0"
    target = load_target("smollm2")
    verifier = str(target.config._name_or_path)
    drafter = load_drafter_ref(ref, target)
    ours = {k: v.detach().cpu() for k, v in drafter.state_dict().items()}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        spec = export_drafter(
            drafter, Path(tmp) / "spec", fmt="speculators", verifier=verifier,
            verifier_config=target.config.to_dict(),
        )  # fmt: skip
        config = Eagle3SpeculatorConfig.from_pretrained(str(spec))
        model = Eagle3DraftModel.from_pretrained(str(spec))
        result = {
            "layout": "speculators",
            "config_class": type(config).__name__,
            "model_class": type(model).__name__,
            "aux_layer_ids": list(model.config.eagle_aux_hidden_state_layer_ids),
            **compare(dict(model.state_dict()), ours),
        }
        print(json.dumps(result))
        ok &= result["tensors_equal"] == result["tensors"] and bool(result["d2t_exact"])
        sgl = export_drafter(
            drafter, Path(tmp) / "sgl", fmt="sglang", verifier=verifier,
            verifier_config=target.config.to_dict(),
        )  # fmt: skip
        converted = Path(tmp) / "converted"
        Eagle3Converter().convert(
            sgl, converted, base_model=verifier, validate=True,
            eagle_aux_hidden_state_layer_ids=[i + 1 for i in drafter.cfg.feature_layers],
        )  # fmt: skip
        from safetensors.torch import load_file

        theirs = {}
        for shard in converted.glob("*.safetensors"):
            theirs.update(load_file(str(shard)))
        result = {"layout": "sglang", "converted_by": "speculators Eagle3Converter",
                  **compare(theirs, ours)}  # fmt: skip
        print(json.dumps(result))
        ok &= result["tensors_equal"] == result["tensors"] and bool(result["d2t_exact"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
