"""Pure statistics and text tables: medians with min and max, ratios of medians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """n samples reduced to median, min and max (ms unless said otherwise)."""

    n: int
    median: float
    min: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, digits: int = 1) -> str:
        """`median (min-max)`, or `—` when there were no samples."""
        if self.n == 0:
            return "—"
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}–{self.max:.{digits}f})"


EMPTY = Summary(0, math.nan, math.nan, math.nan)


def summarize(values: Iterable[float]) -> Summary:
    """Median, min and max of the finite values; EMPTY when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return EMPTY
    return Summary(len(xs), statistics.median(xs), min(xs), max(xs))


def ratio(numerator: Summary, denominator: Summary) -> float:
    """Ratio of the medians; NaN when either side has no samples or the divisor is 0."""
    if numerator.n == 0 or denominator.n == 0 or denominator.median == 0:
        return math.nan
    return numerator.median / denominator.median


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Summary:
    """Round-by-round ratios (a[i] / b[i]) of two alternating series, summarized."""
    pairs = zip(numerators, denominators, strict=False)
    return summarize(a / b for a, b in pairs if b)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells are str()-ed, `|` escaped."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            v = "—" if math.isnan(v) else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
