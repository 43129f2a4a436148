"""Target loading, drafters and checkpoint I/O."""

from draftopd.models.target import TargetModel, TargetOutput, load_target

__all__ = ["TargetModel", "TargetOutput", "load_target"]
