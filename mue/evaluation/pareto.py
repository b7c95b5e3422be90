"""Pareto front of (saving, quality) points, both maximised.

Used to mark the threshold settings worth reporting: a setting is dominated when another one
saves at least as much time with at least the same quality, and is strictly better in one.
"""
import math
from typing import List, Sequence, Tuple

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices (ascending) of the non-dominated points of ``[(x_saving, y_quality), ...]``.

    Both coordinates are maximised.  Exact duplicates do not dominate each other, so all
    copies of a front point are kept.  Non-finite coordinates raise ``ValueError``.
    """
    pts = []
    for i, p in enumerate(points):
        try:
            x, y = (float(v) for v in p)
        except (TypeError, ValueError):
            raise ValueError(f"pareto_front: point {i} must be a pair of numbers, got {p!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"pareto_front: point {i} has a non-finite coordinate: {(x, y)}")
        pts.append((x, y))

    def dominates(a, b):
        return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])

    return [i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)]
