"""Fixed log-scale latency buckets, so hourly rollups can be summed and
still give percentiles (within one bucket's width, 25%)."""

from __future__ import annotations

import math
from collections.abc import Sequence

BASE_MS = 0.05
GROWTH = 1.25
BUCKETS = 80  # covers 0.05 ms .. ~2.8 hours


def bucket_of(ms: float) -> int:
    if ms <= BASE_MS:
        return 0
    return min(BUCKETS - 1, 1 + int(math.log(ms / BASE_MS, GROWTH)))


def bucket_bounds(i: int) -> tuple[float, float]:
    if i == 0:
        return 0.0, BASE_MS
    return BASE_MS * GROWTH ** (i - 1), BASE_MS * GROWTH**i


def empty() -> list[int]:
    return [0] * BUCKETS


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated within its bucket."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q / 100 * (total - 1)
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n > rank:
            lo, hi = bucket_bounds(i)
            frac = (rank - seen + 0.5) / n
            return lo + (hi - lo) * min(max(frac, 0.0), 1.0)
        seen += n
    return bucket_bounds(len(hist) - 1)[1]
