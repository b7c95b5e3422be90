"""Evaluation helpers: COCO caption metrics (pycocoevalcap) and the decomposable statistics
(BLEU counts; CIDEr-D with a fixed document-frequency table is in cider_d) that fairseq validation sums over batches.

Reports over result records: ``records`` (the record format, the full model, threshold selection),
``tables`` (markdown), ``plots`` (curves), ``report`` and ``paper_tables`` (the two report commands);
``sweep`` writes the records, one fairseq-generate run per exit setting."""
from .caption_metrics import (
    ALL_METRICS,
    CaptionResults,
    bleu_stats,
    compute_caption_metrics,
    corpus_bleu,
    spice_available,
)

__all__ = [
    "ALL_METRICS",
    "CaptionResults",
    "bleu_stats",
    "compute_caption_metrics",
    "corpus_bleu",
    "spice_available",
]
