"""Pure helpers for benchmark figures: percentiles, rates, propagation delays, rotation windows, the printed table."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from issuer.audit import report


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank as in the trust-debt report; NaN for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    v = report.percentile(list(values), p)
    return math.nan if v is None else v


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


def propagation_delays(returned_at: dict[int, float], received: Iterable[tuple[int, int, float]],
                       streams: int) -> list[float]:
    """Milliseconds from each revocation's command returning (by seq) to each stream applying it.

    `received` holds (stream, seq, unix time) triples; events for other seqs are ignored. Every
    (seq, stream) pair must be present: a stream that never applied a revocation is a failure,
    not a missing sample. A stream that applied it before the command had returned counts as 0.
    """
    got: dict[tuple[int, int], float] = {}
    for stream, seq, t in received:
        if seq in returned_at:
            got.setdefault((seq, stream), t)
    missing = [(seq, s) for seq in returned_at for s in range(streams) if (seq, s) not in got]
    if missing:
        raise ValueError(f"{len(missing)} (revocation, stream) pairs never arrived, e.g. seq {missing[0][0]} "
                         f"on stream {missing[0][1]}")
    return [max(0.0, (t - returned_at[seq]) * 1000) for (seq, _), t in got.items()]


# "During the rotation": calls started this close to the successor's first leaf. "Without rotation": calls started
# at least QUIET_S from both the successor's preparation and its activation.
ROTATION_WINDOW_S = 1.0
QUIET_S = 3.0


def rotation_windows(at: list[float], lat: list[float], warm_from: float, prepared: float, activated: float
                     ) -> dict[str, list[float]]:
    """Latencies split by when each call started: near the activation (the first leaf from the successor), near
    its preparation (`prepared`, whole seconds as stored: the window covers that second), and quiet (far from
    both, after warm-up)."""
    out: dict[str, list[float]] = {"activate": [], "prepare": [], "quiet": []}
    for t, ms in zip(at, lat):
        if t < warm_from:
            continue
        if abs(t - activated) <= ROTATION_WINDOW_S:
            out["activate"].append(ms)
        elif prepared - ROTATION_WINDOW_S <= t <= prepared + 1 + ROTATION_WINDOW_S:
            out["prepare"].append(ms)
        elif abs(t - activated) >= QUIET_S and not prepared - QUIET_S <= t <= prepared + 1 + QUIET_S:
            out["quiet"].append(ms)
    return out
