"""EAGLE-3 drafters in the layouts vLLM and SGLang load, and back (``draftopd export``/``import``).

Two layouts of the same tensors (docs/interop.md):

- ``speculators`` (vLLM): ``config.json`` in the speculators format (``speculators_model_type``
  "eagle3", a ``transformer_layer_config`` of the one decoder layer, the verifier and the proposal
  method); tensors ``fc``, ``layers.0.*``, ``norm``, ``lm_head``, ``d2t`` and ``t2d``.
- ``sglang`` (SpecForge's output, SGLang's ``LlamaForCausalLMEagle3``): a Llama config with
  ``draft_vocab_size``; the layer's tensors are ``midlayer.*``.

Both store ``d2t`` as offsets (target id = draft id + d2t[draft id]) and ``t2d`` as a boolean mask
over the target vocabulary; draftopd keeps absolute ids and draft indices, and converts exactly.
The fused target layers are named as those servers count them: the hidden state entering layer
i + 1 is the output of draftopd's feature layer i. No file holds the embedding: the drafter uses
the target's, as vLLM and SGLang do when a checkpoint has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftopd.models.drafter import Drafter
from draftopd.models.eagle3.model import Eagle3Config
from draftopd.models.families import family
from draftopd.models.target import TargetModel

FORMATS = ("speculators", "sglang")
WEIGHTS = "model.safetensors"
PROVENANCE = "draftopd.json"  # what draftopd knows and the layouts have no field for
_LAYER = (
    "input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)  # fmt: skip
_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
_TOP = ("fc.weight", "norm.weight", "lm_head.weight")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def server_layer_ids(feature_layers: tuple[int, ...]) -> list[int]:
    """vLLM/SGLang's aux hidden-state ids (the layer whose input is taken) of our feature layers
    (the layer whose output is taken)."""
    return [int(i) + 1 for i in feature_layers]


def export_drafter(
    drafter: Drafter,
    out: str | Path,
    *,
    fmt: str,
    verifier: str,
    verifier_config: dict[str, Any],
    num_speculative_tokens: int = 4,
    dtype: str = "float32",
) -> Path:
    """Write ``drafter`` (EAGLE-3) to ``out`` in layout ``fmt``; return ``out``.

    ``verifier`` names the target as the server should load it (a hub id or a path);
    ``verifier_config`` is the target's ``config.json`` as a dict (architectures, vocab,
    rope and context settings are copied from it)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not supported; choose one of {FORMATS}")
    if drafter.cfg.architecture != "eagle3":
        raise ValueError(
            f"export takes EAGLE-3 drafters; this one is {drafter.cfg.architecture} "
            "(our DFlash has no q/k norms, drafts through a reduced head and may learn its mask "
            "embedding, none of which the published DFlash layout holds: docs/interop.md)"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(_DTYPES)}")
    cfg = drafter.cfg
    assert isinstance(cfg, Eagle3Config)
    state = {k: v.detach().cpu() for k, v in drafter.state_dict().items()}
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    tensors: dict[str, torch.Tensor] = {}
    for name in _TOP:
        tensors[name] = state[name]
    for name in _LAYER:
        tensors[layer + name] = state[name]
    for name in _MLP:
        tensors[f"{layer}mlp.{name}"] = state[name]
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    d2t = state["d2t"].long()
    tensors["d2t"] = (d2t - torch.arange(d2t.numel())).contiguous()
    mask = torch.zeros(cfg.target_vocab_size, dtype=torch.bool)
    mask[d2t] = True
    tensors["t2d"] = mask
    layer_config = _layer_config(cfg, verifier_config, dtype)
    if fmt == "speculators":
        config = _speculators_config(cfg, layer_config, verifier, verifier_config, dtype)
        config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = int(
            num_speculative_tokens
        )
    else:
        config = {
            **layer_config,
            "architectures": ["LlamaForCausalLMEagle3"],
            "draft_vocab_size": cfg.draft_vocab_size,
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": server_layer_ids(cfg.feature_layers)
            },
        }
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    provenance = {
        "format": fmt,
        "architecture": cfg.architecture,
        "feature_layers": list(cfg.feature_layers),
        "target_model": cfg.target_model,
        "target_fingerprint": cfg.target_fingerprint,
    }
    (directory / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return directory


def _layer_config(cfg: Eagle3Config, verifier_config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The one decoder layer as a Llama config (what both servers build the layer from)."""
    keep = ("rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")
    return {
        "model_type": "llama",
        "vocab_size": cfg.target_vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": int(verifier_config.get("max_position_embeddings", 8192)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        **{k: verifier_config[k] for k in keep if verifier_config.get(k) is not None},
    }


def _speculators_config(
    cfg: Eagle3Config,
    layer_config: dict[str, Any],
    verifier: str,
    verifier_config: dict[str, Any],
    dtype: str,
) -> dict[str, Any]:
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config,
        "draft_vocab_size": cfg.draft_vocab_size,
        "norm_before_residual": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": server_layer_ids(cfg.feature_layers),
        "torch_dtype": dtype,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 4}],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": verifier,
                "architectures": list(verifier_config.get("architectures") or []),
            },
        },
    }


def detect_format(directory: str | Path) -> str:
    """ "speculators" or "sglang" from a directory's config.json; ValueError for anything else."""
    config = _read_config(Path(directory))
    if config.get("speculators_model_type") == "eagle3":
        return "speculators"
    if "LlamaForCausalLMEagle3" in (config.get("architectures") or []):
        return "sglang"
    kind = config.get("speculators_model_type") or config.get("architectures")
    raise ValueError(
        f"{directory}: not an EAGLE-3 drafter in a layout draftopd reads ({kind!r}); "
        "expected speculators_model_type 'eagle3' or architectures ['LlamaForCausalLMEagle3']"
    )


def import_drafter(directory: str | Path, target: TargetModel) -> Drafter:
    """The drafter an exported directory holds, for ``target`` (checked against it)."""
    root = Path(directory)
    fmt = detect_format(root)
    config = _read_config(root)
    layer_config = config["transformer_layer_config"] if fmt == "speculators" else config
    if fmt == "speculators":
        aux = config.get("eagle_aux_hidden_state_layer_ids")
    else:
        aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    feature_layers = (
        tuple(int(i) - 1 for i in aux) if aux else tuple(target.feature_layers)
    )  # servers default to the same layers draftopd does
    if len(feature_layers) != 3:
        raise ValueError(f"{root}: expected 3 aux hidden-state layers, got {aux}")
    kind = family("eagle3")
    cfg = kind.config_for_target(
        target.config,
        feature_layers=(feature_layers[0], feature_layers[1], feature_layers[2]),
        draft_vocab_size=int(config["draft_vocab_size"]),
        target_model=target.name,
        target_fingerprint=target.fingerprint,
    )
    assert isinstance(cfg, Eagle3Config)
    _check_shape(root, cfg, layer_config)
    try:
        tensors = load_file(str(root / WEIGHTS))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{root / WEIGHTS}: unreadable ({err})") from err
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    ours: dict[str, torch.Tensor] = {}
    try:
        for name in _TOP:
            ours[name] = tensors[name].float()
        for name in _LAYER:
            ours[name] = tensors[layer + name].float()
        for name in _MLP:
            ours[name] = tensors[f"{layer}mlp.{name}"].float()
        offsets = tensors["d2t"].long()
    except KeyError as err:
        raise ValueError(f"{root / WEIGHTS}: missing tensor {err}") from err
    d2t = offsets + torch.arange(offsets.numel())
    if "t2d" in tensors:
        mask = torch.zeros(cfg.target_vocab_size, dtype=torch.bool)
        mask[d2t] = True
        if not torch.equal(tensors["t2d"].bool(), mask):
            raise ValueError(f"{root}: t2d does not mark exactly the d2t target ids")
    drafter = kind.build(cfg)
    missing, unexpected = drafter.load_state_dict(ours, strict=False)
    if unexpected or set(missing) - {"d2t", "t2d"}:
        raise ValueError(f"{root}: tensors mismatch: missing={missing}, unexpected={unexpected}")
    drafter.set_draft_vocab(d2t)
    drafter.attach_embedding(target.embed_tokens)
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def _check_shape(root: Path, cfg: Eagle3Config, layer_config: dict[str, Any]) -> None:
    wanted = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.target_vocab_size,
    }
    wrong = {k: (layer_config.get(k), v) for k, v in wanted.items() if layer_config.get(k) != v}
    if wrong:
        raise ValueError(f"{root}: built for another target: (file, target) = {wrong}")


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


__all__ = [
    "FORMATS",
    "detect_format",
    "export_drafter",
    "import_drafter",
    "server_layer_ids",
]
