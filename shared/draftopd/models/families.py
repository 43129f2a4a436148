"""The registry of drafter families: checkpoints are loaded by their ``architecture`` tag.

Adding a family is one entry here plus its module (see ``models/drafter.py``). Nothing else in
the library imports a family's module directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from draftopd.models.dflash.drafter import DFlashDrafter, random_dflash
from draftopd.models.dflash.model import DFlashConfig
from draftopd.models.drafter import Drafter, DrafterConfig
from draftopd.models.eagle3.model import Eagle3Config, Eagle3Drafter, random_drafter

DEFAULT_ARCHITECTURE = "eagle3"


@dataclass(frozen=True)
class DrafterFamily:
    architecture: str  # the checkpoint tag (config.json "architecture")
    config_from_dict: Callable[[dict[str, Any]], DrafterConfig]  # raises ValueError on bad keys
    build: Callable[[Any], Drafter]  # an untrained drafter of a config (weights to be loaded)
    # a config sized for a target (HF config, feature layers, draft vocab, name, fingerprint)
    config_for_target: Callable[..., DrafterConfig]
    random: Callable[..., Drafter]  # (config, *, seed) -> a seeded random-init drafter


FAMILIES: dict[str, DrafterFamily] = {
    "eagle3": DrafterFamily(
        architecture="eagle3",
        config_from_dict=Eagle3Config.from_dict,
        build=Eagle3Drafter,
        config_for_target=Eagle3Config.for_target,
        random=random_drafter,
    ),
    "dflash": DrafterFamily(
        architecture="dflash",
        config_from_dict=DFlashConfig.from_dict,
        build=DFlashDrafter,
        config_for_target=DFlashConfig.for_target,
        random=random_dflash,
    ),
}


def family(architecture: str) -> DrafterFamily:
    """The family of ``architecture``; a ValueError names the supported ones."""
    found = FAMILIES.get(architecture)
    if found is None:
        raise ValueError(
            f"unsupported drafter architecture {architecture!r}; supported: {sorted(FAMILIES)}"
        )
    return found


__all__ = ["DEFAULT_ARCHITECTURE", "FAMILIES", "DrafterFamily", "family"]
