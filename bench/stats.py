"""Repeated measurements reduced to a median and a spread.

The machine is shared and has two cores, so single runs are noisy; every phase runs several
times and the report shows the median with the lowest and highest run beside it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["Stat"]


@dataclass(frozen=True)
class Stat:
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Stat:
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def low(self) -> float:
        return min(self.runs) if self.runs else float("nan")

    @property
    def high(self) -> float:
        return max(self.runs) if self.runs else float("nan")

    def show(self, digits: int = 0, unit: str = "") -> str:
        """``median (low..high) unit``; the range is left out for a single run."""
        fmt = f"{{:,.{digits}f}}"
        text = fmt.format(self.median)
        if len(self.runs) > 1:
            text += f" ({fmt.format(self.low)}..{fmt.format(self.high)})"
        return f"{text} {unit}".rstrip()

    def as_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "runs": list(self.runs),
        }
