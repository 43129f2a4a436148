"""The benchmark's settings (docs/design.md §6), torch-free: the command line builds the
``draftopd bench`` flags from these fields without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from draftopd.config_fields import setting
from draftopd.training.configs import DTYPES
from draftopd.wire.formats import DEFAULT_TARGET, parse_draft_tree, parse_random_ref

METHODS = ("eagle3", "dflash", "ngram", "none")
DRAFTER_METHODS = ("eagle3", "dflash")  # the methods that run a trained (or random) drafter
STEPS = ("auto", "lean", "hf")  # mirrors models/target.py (this module stays torch-free)
KERNELS = ("auto", "native", "torch")  # mirrors models/lean_llama.py
DRAFT_WEIGHTS = ("auto", "bfloat16", "int8", "float32", "module")  # mirrors Eagle3Drafter.lean_step
DEFAULT_DRAFTER = "random:0"  # a seeded random-init drafter, until a trained one is given


@dataclass(frozen=True)
class DrafterRef:
    """Where an EAGLE-3 drafter comes from: a checkpoint directory or a random init."""

    path: Path | None  # checkpoint directory (config.json + model.safetensors); None = random
    seed: int  # seed of the random-init drafter (unused for a checkpoint)
    draft_vocab_size: int | None = None  # random init: its LM head size (None = the default)


def parse_drafter_ref(ref: str) -> DrafterRef:
    """``random:SEED``, ``random:SEED:VOCAB`` (a draft vocabulary of VOCAB ids, as a trained
    drafter's) or an existing checkpoint directory; anything else is a ValueError."""
    head, _, vocab = ref.rpartition(":")
    if ref.count(":") == 2 and head.startswith("random:"):
        if not vocab.isdigit() or int(vocab) < 1:
            raise ValueError(f"drafter {ref!r}: expected 'random:SEED:VOCAB' with VOCAB >= 1")
        seed = parse_random_ref(head)
        assert seed is not None
        return DrafterRef(path=None, seed=seed, draft_vocab_size=int(vocab))
    seed = parse_random_ref(ref)
    if seed is not None:
        return DrafterRef(path=None, seed=seed)
    path = Path(ref).expanduser()
    if path.is_dir():
        return DrafterRef(path=path, seed=0)
    raise ValueError(
        f"drafter {ref!r} is neither a checkpoint directory nor random:SEED[:VOCAB] "
        "(registry references are not supported yet)"
    )


@dataclass(frozen=True)
class BenchConfig:
    prompts: str | None = setting(None, "JSONL prompt file; none = MT-Bench question.jsonl")
    limit: int | None = setting(None, "use only the first N prompts")
    max_new_tokens: int = setting(128, "M, the cap on generated tokens per prompt")
    method: str = setting("eagle3", "proposer of the speculative run", choices=METHODS)
    drafter: str | None = setting(
        None, "eagle3/dflash: a checkpoint directory or random:SEED[:VOCAB] (none = random:0)"
    )
    num_draft_tokens: int = setting(4, "K, drafts proposed per verification cycle")
    temperature: float = setting(0.0, "0 = greedy; > 0 samples (HF peers always run greedy)")
    peers: bool = setting(False, "also time Hugging Face generate (greedy and prompt lookup)")
    target: str = setting(DEFAULT_TARGET, "target: smollm2, a directory or a .gguf")
    device: str | None = setting(None, "torch device; none = cuda when available, else cpu")
    dtype: str = setting("float32", "target dtype", choices=DTYPES)
    seed: int = setting(0, "torch seed; prompt i samples with seed + i when temperature > 0")
    threads: int | None = setting(None, "torch intra-op CPU threads; none = torch's default")
    warmup: bool = setting(True, "one untimed generation per path before timing", cli=False)
    repeats: int = setting(
        1, "run every path N times per prompt (order rotated) and keep the fastest"
    )
    progress: bool = setting(True, "tqdm progress bar on stderr", cli=False)
    step: str = setting(
        "auto",
        "decode step: lean (Llama family) or hf; auto = lean where supported",
        choices=STEPS,
    )
    kernel: str = setting(
        "auto", "lean step's matrix products: native small-M GEMM or torch", choices=KERNELS
    )
    draft_weights: str = setting(
        "auto",
        "drafter's decode-time weights: bfloat16, int8 or float32 (native kernel) or module; "
        "auto = bfloat16 where the kernel runs",
        choices=DRAFT_WEIGHTS,
    )
    costs: bool = setting(
        False, "print the per-step cost table (target forwards, drafting, cycle/plain) instead"
    )
    sweep_k: str | None = setting(
        None, "also run the method at each of these K in the same run, e.g. 2,3,4,5,6,7"
    )
    with_ngram: bool = setting(
        False, "also run n-gram prompt lookup in the same run (at K, or at N with lookup_first)"
    )
    draft_stop_below: float = setting(
        0.0,
        "eagle3/dflash: end a cycle's drafts before the first slot (after the first) where the "
        "drafter's most likely token is below this probability (0 = always K)",
    )
    sweep_stop_below: str | None = setting(
        None, "also run the method at each of these draft_stop_below floors, e.g. 0.2,0.4"
    )
    sweep_lookup: str | None = setting(
        None, "also run the drafter behind n-gram lookup of each of these N, e.g. 4,8"
    )
    lookup_first: int = setting(
        0,
        "eagle3/dflash: try n-gram lookup first (up to N tokens), the drafter where the context "
        "does not repeat; also runs the drafter alone at K in the same run (0 = off)",
    )
    draft_tree: str | None = setting(
        None,
        "eagle3: draft a dynamic tree BRANCHxNODES[:MINPROB] (e.g. 3x10:0.05) of depth K "
        "instead of a chain; also runs the chain at K in the same run (and alone, with "
        "lookup_first)",
    )
    sweep_tree: str | None = setting(
        None, "also run the drafter with each of these trees, e.g. 2x6,3x10,4x16:0.05"
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} not supported; choose one of {METHODS}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.step not in STEPS:
            raise ValueError(f"step {self.step!r} not supported; choose one of {STEPS}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r} not supported; choose one of {KERNELS}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(
                f"draft_weights {self.draft_weights!r} not supported; choose one of {DRAFT_WEIGHTS}"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.sweep_k is not None:
            if self.method == "none":
                raise ValueError("sweep_k needs a speculative method")
            self.sweep  # noqa: B018 (validates the list)
        if not 0.0 <= self.draft_stop_below <= 1.0:
            raise ValueError(f"draft_stop_below must be in [0, 1], got {self.draft_stop_below}")
        if (self.draft_stop_below or self.sweep_stop_below) and self.method not in DRAFTER_METHODS:
            raise ValueError("draft_stop_below needs a drafter method (eagle3 or dflash)")
        self.stop_floors  # noqa: B018 (validates the list)
        if self.lookup_first < 0:
            raise ValueError(f"lookup_first must be >= 0, got {self.lookup_first}")
        if self.sweep_lookup is not None:
            self.lookups  # noqa: B018 (validates the list)
        if (self.lookup_first or self.sweep_lookup) and self.method not in DRAFTER_METHODS:
            raise ValueError(
                f"lookup_first combines n-gram lookup with a drafter: use a method in "
                f"{DRAFTER_METHODS}, not {self.method!r}"
            )
        if self.draft_tree is not None:
            parse_draft_tree(self.draft_tree)
        self.trees  # noqa: B018 (validates the list)
        if (self.draft_tree or self.sweep_tree) and self.method != "eagle3":
            raise ValueError(f"draft trees need method 'eagle3', not {self.method!r}")
        if (self.draft_tree or self.sweep_tree) and self.draft_stop_below:
            raise ValueError("a draft tree and draft_stop_below do not combine")
        if self.drafter is not None:
            if self.method not in DRAFTER_METHODS:
                raise ValueError(
                    f"a drafter applies only to methods {DRAFTER_METHODS}, not {self.method!r}"
                )
            parse_drafter_ref(self.drafter)

    @property
    def lookups(self) -> tuple[int, ...]:
        """The N values of ``sweep_lookup`` (empty without it)."""
        return _positive_ints("sweep_lookup", self.sweep_lookup)

    @property
    def trees(self) -> tuple[str, ...]:
        """The BRANCHxNODES shapes of ``sweep_tree`` (empty without it)."""
        if not self.sweep_tree:
            return ()
        shapes = tuple(part.strip() for part in self.sweep_tree.split(","))
        for shape in shapes:
            parse_draft_tree(shape)
        return shapes

    @property
    def stop_floors(self) -> tuple[float, ...]:
        """The floors of ``sweep_stop_below`` (empty without it)."""
        if not self.sweep_stop_below:
            return ()
        try:
            floors = tuple(float(p) for p in self.sweep_stop_below.split(","))
        except ValueError:
            floors = (-1.0,)
        if not all(0.0 <= f <= 1.0 for f in floors):
            raise ValueError(
                f"sweep_stop_below {self.sweep_stop_below!r}: expected probabilities in [0, 1], "
                "e.g. 0.2,0.4"
            )
        return floors

    @property
    def sweep(self) -> tuple[int, ...]:
        """The K values of ``sweep_k`` (empty without it)."""
        return _positive_ints("sweep_k", self.sweep_k)

    @property
    def drafter_ref(self) -> str | None:
        """The drafter actually used: the given one, random:0 for a drafter method, else None."""
        if self.method not in DRAFTER_METHODS:
            return None
        return self.drafter or DEFAULT_DRAFTER


__all__ = [
    "DEFAULT_DRAFTER",
    "DRAFTER_METHODS",
    "METHODS",
    "BenchConfig",
    "DrafterRef",
    "parse_drafter_ref",
]


def _positive_ints(name: str, value: str | None) -> tuple[int, ...]:
    """A comma-separated list of positive integers, sorted and deduplicated (empty for None)."""
    if not value:
        return ()
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{name} {value!r}: expected positive integers, e.g. 2,4,6")
    return tuple(sorted({int(p) for p in parts}))
