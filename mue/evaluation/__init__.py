"""Evaluation helpers: COCO caption metrics (pycocoevalcap) and the decomposable statistics
(BLEU counts; CIDEr-D with a fixed document-frequency table is in cider_d) that fairseq validation sums over batches."""
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
