"""The EAGLE-3 drafter family: the model, its proposer, training-time test and batched unroll.

Code outside this package reaches it through the drafter seam (``models.drafter.Drafter``) and
the family registry (``models.families``).
"""

from draftopd.models.eagle3.model import (
    DrafterCache,
    DrafterOutput,
    Eagle3Config,
    Eagle3Drafter,
    random_drafter,
)

__all__ = ["DrafterCache", "DrafterOutput", "Eagle3Config", "Eagle3Drafter", "random_drafter"]
