"""95 % intervals on "% of full": a setting's quality as a share of the full model's, by a paired bootstrap
over the examples both records scored (the same draw of examples for both, so what they share cancels).

Per-example quality: captioning, each image's CIDEr (pycocoevalcap's, document frequencies from the split's
references, so that the mean is the reported corpus CIDEr); SNLI-VE, whether the answer is right (the mean
is the accuracy). Other metrics (BLEU, METEOR, ...) are not means over examples and get no interval here.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .paired_bootstrap import bootstrap_counts, per_image_scores

ROUNDS = 1000


def per_example_quality(record: dict, key: str) -> Optional[Dict[str, float]]:
    """{example id: quality} of a result record with per-example ``predictions``; None when the record has
    none or ``key`` is not a mean over examples."""
    preds = record.get("predictions")
    if not isinstance(preds, list) or not preds:
        return None
    if key == "accuracy" and all("prediction" in p and "answer" in p for p in preds):
        return {str(p["uniq_id"]): float(p["prediction"] == p["answer"]) for p in preds}
    if key == "CIDEr" and all("caption" in p and "refs" in p for p in preds):
        ids = [str(p["uniq_id"]) for p in preds]
        scores = per_image_scores({i: p["caption"] for i, p in zip(ids, preds)},
                                  {i: p["refs"] for i, p in zip(ids, preds)})["cider"]
        return dict(zip(ids, scores.tolist()))
    return None


def ratio_interval(values: Dict[str, float], full: Dict[str, float], rounds: int = ROUNDS,
                   seed: int = 1) -> Optional[Tuple[float, float]]:
    """The 2.5 and 97.5 percentiles of mean(values) / mean(full) over ``rounds`` paired resamples of the
    examples; None when the two do not score the same examples or the full model scores 0."""
    if not values or set(values) != set(full):
        return None
    ids = sorted(full)
    a = np.array([full[i] for i in ids])
    b = np.array([values[i] for i in ids])
    counts = bootstrap_counts(len(ids), rounds, seed)
    num, den = counts @ b, counts @ a
    if (den <= 0).any():
        return None
    low, high = np.percentile(num / den, [2.5, 97.5])
    return float(low), float(high)


def interval_cells(records: Sequence[dict], full: dict, key: str) -> List[str]:
    """Each record's 95 % interval of "% of full" as a table cell, "n/a" where none applies."""
    base = per_example_quality(full, key)
    cells = []
    for rec in records:
        values = per_example_quality(rec, key) if base else None
        interval = ratio_interval(values, base) if values else None
        cells.append("n/a" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]")
    return cells
