"""Cosine-similarity exit policy: when does a stream stop running layers?

MuE stops a stream (image, text or decoder) after layer i when the hidden states
of layer i and layer i-1 are nearly identical: ``cos(h_i, h_{i-1}) > threshold``
(layer 1 compares with the embedding output).  The decision is made **per row**
(sample, or beam row while decoding) over that row's non-padding tokens only;
the public reference decided once per batch over the flattened tensor, padding
included, which is why it had to evaluate at batch size 1.

Reduction over tokens.  A row's similarity is the *mean over its non-padding
tokens of the per-token cosine similarity* (each token's C-dimensional vector
compared with the same token at the previous layer).  This is the paper's
layer-wise similarity of hidden states, and a per-token mean is robust to a few
tokens with very large norms: if the whole row were flattened into one vector
(the alternative, ``cos(vec(H_i), vec(H_{i-1}))``), those tokens would dominate
the dot product and hide the behaviour of all others.

Threshold semantics (``should_exit``): exit when ``sim > threshold``.
  * a threshold >= NEVER_EXIT (1.0, mue.exiting.config) never exits, even where
    the similarity rounds to 1.0, so such thresholds reproduce the full model exactly;
  * threshold -1.0 (the lowest accepted value) exits after the first layer unless
    the similarity is exactly -1 (cosine is always >= -1).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .config import NEVER_EXIT, never_exits, validate_threshold  # noqa: F401  (validate_threshold: re-export)

__all__ = ["CosineExitPolicy", "validate_threshold", "NEVER_EXIT"]


class CosineExitPolicy:
    """Per-row exit decision from the cosine similarity of consecutive layers.

    Args:
        eps: guard on the product of norms, so that a zero vector gives
            similarity 0 instead of NaN.
        strict: if True, ``similarity`` raises ``ValueError`` on a row whose
            tokens are all padding; if False (default) such a row gets similarity
            1.0, i.e. it exits at once (it has nothing left to compute).  Callers
            must not pass empty rows for a stream that exists; absent streams
            (e.g. a row without an image) should be skipped by the caller.
    """

    def __init__(self, eps: float = 1e-8, strict: bool = False):
        if not eps > 0:
            raise ValueError(f"CosineExitPolicy: eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.strict = bool(strict)

    def similarity(
        self,
        h_new: Tensor,
        h_old: Tensor,
        pad_mask: Optional[Tensor] = None,
        time_first: bool = False,
    ) -> Tensor:
        """Mean per-token cosine similarity per row.

        Args:
            h_new, h_old: hidden states of layer i and i-1, ``[B, T, C]``
                (batch-first, the default) or ``[T, B, C]`` with ``time_first=True``
                (fairseq's layer layout).
            pad_mask: optional ``BoolTensor[B, T]`` (always batch-first, as
                fairseq's ``encoder_padding_mask``), True at padding positions.
        Returns:
            ``FloatTensor[B]`` (float32, or float64 for float64 inputs), in [-1, 1].
        """
        if h_new.shape != h_old.shape or h_new.dim() != 3:
            raise ValueError(
                "CosineExitPolicy.similarity: h_new and h_old must have the same 3-d "
                f"shape, got {tuple(h_new.shape)} and {tuple(h_old.shape)}"
            )
        if time_first:
            h_new, h_old = h_new.transpose(0, 1), h_old.transpose(0, 1)
        dtype = torch.float64 if h_new.dtype == torch.float64 else torch.float32
        a, b = h_new.to(dtype), h_old.to(dtype)
        dot = (a * b).sum(-1)
        norms = a.norm(dim=-1) * b.norm(dim=-1)
        per_token = (dot / norms.clamp_min(self.eps)).clamp(-1.0, 1.0)  # [B, T]

        bsz, tlen = per_token.shape
        if pad_mask is None:
            return per_token.mean(dim=1)
        if pad_mask.shape != (bsz, tlen):
            raise ValueError(
                f"CosineExitPolicy.similarity: pad_mask shape {tuple(pad_mask.shape)} "
                f"does not match (batch, time) = {(bsz, tlen)}"
            )
        keep = (~pad_mask.to(torch.bool)).to(dtype)
        count = keep.sum(dim=1)
        empty = count == 0
        if empty.any() and self.strict:
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"CosineExitPolicy.similarity: rows {rows} contain only padding"
            )
        sim = (per_token * keep).sum(dim=1) / count.clamp_min(1.0)
        return torch.where(empty, torch.ones_like(sim), sim)

    @staticmethod
    def should_exit(sim: Tensor, threshold: Union[float, Tensor]) -> Tensor:
        """``BoolTensor[B]``: True where ``sim > threshold`` and threshold < 1.

        ``threshold`` is a float or a tensor broadcastable to ``sim`` (one value
        per row).  Rows whose threshold is >= 1 never exit.
        """
        if not isinstance(threshold, Tensor):
            if never_exits(threshold):
                return torch.zeros_like(sim, dtype=torch.bool)
            return sim > float(threshold)
        threshold = threshold.to(device=sim.device)
        return (sim > threshold) & (threshold < NEVER_EXIT)

    def __repr__(self):
        return f"CosineExitPolicy(eps={self.eps}, strict={self.strict})"
