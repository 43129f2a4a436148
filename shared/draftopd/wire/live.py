"""Live counts: what an inference instance measures per served drafter version, and what the
registry sums (issue #17; docs/traffic.md). Torch-free: both services use it.

The counts are those of one report (``POST /drafters/{name}/versions/{v}/live-metrics``):
requests, verification cycles, the sums over cycles of the accepted drafts and of their squares,
generated tokens and decode seconds. From them: τ = 1 + Σa / cycles (committed tokens per cycle,
the bonus token included), the variance of the per-cycle τ, its standard error over cycles, and
tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class LiveCounts:
    requests: int = 0
    cycles: int = 0
    accepted: int = 0  # sum over cycles of the accepted drafts
    accepted_sq: int = 0  # sum over cycles of their squares
    generated_tokens: int = 0
    decode_s: float = 0.0

    def add(self, other: LiveCounts) -> None:
        for field in fields(LiveCounts):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def report_fields(self) -> dict[str, Any]:
        """The counts as a report's fields (``LiveCounts`` only, not a subclass's extras)."""
        values = asdict(self)
        return {field.name: values[field.name] for field in fields(LiveCounts)}

    @property
    def tau(self) -> float | None:
        return 1.0 + self.accepted / self.cycles if self.cycles else None

    @property
    def variance(self) -> float | None:
        """Variance of the per-cycle committed tokens (that of accepted: the +1 shifts it)."""
        if not self.cycles:
            return None
        mean = self.accepted / self.cycles
        return max(self.accepted_sq / self.cycles - mean * mean, 0.0)

    @property
    def stderr(self) -> float | None:
        variance = self.variance
        return math.sqrt(variance / self.cycles) if variance is not None else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else None


__all__ = ["LiveCounts"]
