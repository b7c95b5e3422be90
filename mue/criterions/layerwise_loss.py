"""MuE's layer-wise task loss (paper Eq. 12) as a pure function over stacked decoder states.

Every decoder layer's output goes through the shared final LayerNorm and tied output projection
(`project`) and gets the same label-smoothed cross-entropy as fairseq's `label_smoothed_cross_entropy`
(OFA's constrained variant when a constraint mask is given). The L x N x V logits are never held at
once: tokens are processed in chunks and, when gradients are needed and there is more than one chunk,
each chunk's projection is checkpointed, so peak memory is about one chunk of logits.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits of one chunk, all layers together


def auto_chunk_tokens(num_layers: int, vocab_size: int,
                      budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits (layers x tokens x vocab) fit the budget."""
    return max(1, budget_bytes // (4 * num_layers * vocab_size))


def _chunk_losses(states: Tensor, target: Tensor, constraint_mask: Optional[Tensor],
                  project: Callable[[Tensor], Tensor], epsilon: float,
                  ignore_index: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-layer sums over one chunk of tokens: (smoothed loss [L], nll [L], n_correct [L])."""
    logits = project(states)  # [L, n, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in fp32, as fairseq's get_normalized_probs
    vocab = logits.size(-1)
    if int(target.max()) >= vocab or int(target.min()) < 0:
        raise ValueError(f"target ids must lie in [0, {vocab}) (the projection's vocabulary size); "
                         f"got min {int(target.min())}, max {int(target.max())}")
    if constraint_mask is not None:
        if constraint_mask.size(-1) != vocab:
            raise ValueError(f"constraint_mask has {constraint_mask.size(-1)} columns but the "
                             f"projection gives {vocab} logits")
        if ignore_index is not None:  # ignored rows may have an empty mask: keep them finite
            constraint_mask = constraint_mask | target.eq(ignore_index).unsqueeze(1)
        logits = logits.masked_fill(~constraint_mask.unsqueeze(0), float("-inf"))
    lprobs = F.log_softmax(logits, dim=-1)
    index = target.view(1, -1, 1).expand(lprobs.size(0), -1, 1)
    nll = -lprobs.gather(-1, index).squeeze(-1)  # [L, n]
    if constraint_mask is None:
        smooth = -lprobs.sum(-1)
        eps_i = epsilon / (vocab - 1)
    else:
        # smoothing over the allowed tokens only (OFA); a row with one allowed token has loss 0 anyway
        smooth = -lprobs.masked_fill(~constraint_mask.unsqueeze(0), 0.0).sum(-1)
        eps_i = epsilon / (constraint_mask.sum(-1) - 1).clamp(min=1).to(lprobs.dtype)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    correct = lprobs.argmax(-1).eq(target.unsqueeze(0))
    if ignore_index is not None:
        drop = target.eq(ignore_index).unsqueeze(0)
        loss, nll = loss.masked_fill(drop, 0.0), nll.masked_fill(drop, 0.0)
        correct = correct & ~drop
    return loss.sum(-1), nll.sum(-1), correct.sum(-1)


def layerwise_label_smoothed_nll(
    states: Tensor,
    project: Callable[[Tensor], Tensor],
    target: Tensor,
    epsilon: float,
    ignore_index: Optional[int],
    constraint_mask: Optional[Tensor] = None,
    chunk_tokens: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed NLL of every layer's states, summed over tokens.

    states: [L, N, C] decoder states of the N scored target tokens (select non-pad tokens first).
    project: maps [*, C] -> [*, V] (final LayerNorm + output projection).
    target: [N] token ids; rows equal to `ignore_index` contribute nothing.
    constraint_mask: [N, V] bool, allowed output tokens per row (logits elsewhere are -inf).
    chunk_tokens: tokens per chunk; None or 0 picks it from a 256 MB budget of fp32 logits.
    Returns (loss_per_layer [L], nll_per_layer [L], correct_per_layer [L]); the first two are fp32
    sums (differentiable; fp32 at least), the last integer counts of argmax hits.
    """
    if states.dim() != 3:
        raise ValueError(f"states must be [L, N, C], got shape {tuple(states.shape)}")
    num_layers, num_tokens = states.size(0), states.size(1)
    if target.shape != (num_tokens,):
        raise ValueError(f"target must be [N]={num_tokens}, got shape {tuple(target.shape)}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1), got {epsilon}")
    if constraint_mask is not None:
        if constraint_mask.dim() != 2 or constraint_mask.size(0) != num_tokens:
            raise ValueError(f"constraint_mask must be [N={num_tokens}, V], "
                             f"got shape {tuple(constraint_mask.shape)}")
        constraint_mask = constraint_mask.bool()
        scored = target.ne(ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        safe_target = target.clamp(0, constraint_mask.size(1) - 1).unsqueeze(1)
        bad = scored & ~constraint_mask.gather(1, safe_target).squeeze(1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()[:10]
            raise ValueError(f"target token is outside its constraint mask at token rows {rows} "
                             f"(ids {target[rows].tolist()}): its probability would be 0")

    if num_tokens == 0:  # keep the graph connected so backward() still works
        zero = states.sum() * 0.0
        counts = torch.zeros(num_layers, dtype=torch.long, device=states.device)
        return zero.float().expand(num_layers), zero.float().expand(num_layers), counts

    if not chunk_tokens:
        with torch.no_grad():
            vocab = project(states[:1, :1]).size(-1)
        chunk_tokens = auto_chunk_tokens(num_layers, vocab)
    use_checkpoint = torch.is_grad_enabled() and num_tokens > chunk_tokens

    totals = []
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        mask = constraint_mask[start:end] if constraint_mask is not None else None
        args = (states[:, start:end], target[start:end], mask, project, epsilon, ignore_index)
        if use_checkpoint:
            totals.append(checkpoint(_chunk_losses, *args, use_reentrant=False))
        else:
            totals.append(_chunk_losses(*args))
    loss, nll, correct = (torch.stack(parts).sum(0) for parts in zip(*totals))
    return loss, nll, correct


def mean_over_layers(per_layer: Tensor, layer_weights: Optional[Sequence[float]] = None) -> Tensor:
    """Mean over layers (Eq. 12); with weights, a weighted mean (weights normalised to sum 1)."""
    if layer_weights is None:
        return per_layer.mean(0)
    weights = torch.as_tensor(layer_weights, dtype=per_layer.dtype, device=per_layer.device)
    if weights.shape != per_layer.shape[:1]:
        raise ValueError(f"got {weights.numel()} layer weights for {per_layer.size(0)} layers")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"layer weights must be non-negative with a positive sum, got {list(layer_weights)}")
    weights = weights / weights.sum()
    return (weights.view(-1, *[1] * (per_layer.dim() - 1)) * per_layer).sum(0)
