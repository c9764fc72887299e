"""Pure helpers for benchmark figures: percentiles, rates, and the printed table."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


def rounded(v: float | None, digits: int = 1) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return round(v, digits)


def table(rows: Iterable[tuple[str, object, str]]) -> str:
    """Rows of (key, value, note) as aligned text; None prints as 'n/a'."""
    rows = [(k, "n/a" if v is None else (f"{v:,}" if isinstance(v, (int, float)) else str(v)), n)
            for k, v, n in rows]
    wk = max(len(k) for k, _, _ in rows)
    wv = max(len(v) for _, v, _ in rows)
    return "\n".join(f"{k:<{wk}}  {v:>{wv}}  {n}".rstrip() for k, v, n in rows)
