"""MuE's layer-wise task loss (paper Eq. 12) as a pure function over stacked decoder states.

Every decoder layer's output goes through the shared final LayerNorm and tied output projection
(`project`) and gets the same label-smoothed cross-entropy as fairseq's `label_smoothed_cross_entropy`
(OFA's constrained variant when a constraint mask is given), optionally without each layer's
highest-loss tokens (OFA's drop-worst).

Fused path, used when `project` is `linear(features(x))` (the MuE decoder's `project`, which CONTRACT.md
defines as `output_projection(layer_norm(x))`, an nn.Linear, or an nn.Sequential ending in one): the
features of all L layers are projected chunk by chunk of tokens, one matmul per chunk, and each chunk's
loss *and* its gradient with respect to the features and the projection weight are computed right there
in the forward pass (fused linear + label-smoothed cross-entropy, in place on one logits buffer). The
weight's gradient accumulates in one buffer of the weight's size. The backward pass only scales the
stored gradients, so the L x N x V logits are never held at once, never kept for backward and never
computed a second time. Memory: one chunk's logits (the `chunk_tokens` budget), the features' gradient
(L x N x C) and the weight's (V x C). The math is fp32 throughout; fp16/bf16 inputs are upcast (then an
fp32 copy of the weight is made per call too) and the gradients are returned in the inputs' dtypes.
A frozen weight (requires_grad False) skips its gradient product. Drop-worst projects the dropped
tokens once more, only to take their share out of the weight's gradient. Any other `project` falls back to
plain autograd with each chunk checkpointed (the projection then runs again in backward); both paths
give the same values and gradients.
"""
import logging
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

DEFAULT_LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits of one chunk, all layers together

Head = Tuple[Callable[[Tensor], Tensor], Tensor, Optional[Tensor]]  # (features, weight, bias)


def auto_chunk_tokens(num_layers: int, vocab_size: int,
                      budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits (layers x tokens x vocab) fit the budget."""
    return max(1, budget_bytes // (4 * num_layers * vocab_size))


def drop_worst_keep(num_tokens: int, ratio: float) -> int:
    """Tokens each layer keeps under drop-worst: OFA's int(n * (1 - ratio)) (rounded down)."""
    return int(num_tokens * (1.0 - ratio)) if ratio > 0 else num_tokens


def layer_scale(num_layers: int, layer_weights: Optional[Sequence[float]] = None) -> Tensor:
    """The weights of `mean_over_layers` as an fp32 vector summing to 1 (uniform without weights)."""
    if layer_weights is None:
        return torch.full((num_layers,), 1.0 / num_layers)
    weights = torch.as_tensor([float(w) for w in layer_weights], dtype=torch.float32)
    if weights.numel() != num_layers:
        raise ValueError(f"got {weights.numel()} layer weights for {num_layers} layers")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"layer weights must be non-negative with a positive sum, got {list(layer_weights)}")
    return weights / weights.sum()


def linear_head(project: Callable[[Tensor], Tensor]) -> Optional[Head]:
    """(features, weight, bias) when `project` is structurally linear(features(x)), else None."""
    if isinstance(project, nn.Linear):
        return (lambda x: x), project.weight, project.bias
    if isinstance(project, nn.Sequential) and len(project) > 0 and isinstance(project[-1], nn.Linear):
        return project[:-1], project[-1].weight, project[-1].bias
    owner = getattr(project, "__self__", None)
    out, norm = getattr(owner, "output_projection", None), getattr(owner, "layer_norm", None)
    if getattr(project, "__name__", "") == "project" and isinstance(out, nn.Linear) and isinstance(norm, nn.Module):
        return norm, out.weight, out.bias  # CONTRACT.md: decoder.project = output_projection(layer_norm(x))
    return None


def _verified_head(project, probe: Tensor, logits: Tensor) -> Optional[Head]:
    """linear_head(project), kept only if it reproduces `project`'s logits on the probe row."""
    head = linear_head(project)
    if head is None:
        return None
    features, weight, bias = head
    with torch.no_grad():
        again = F.linear(features(probe), weight, bias)
    if again.shape != logits.shape or not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-4):
        logger.warning("layer-wise loss: %r is not linear(features(x)) as its structure suggests; using the "
                       "checkpointed (slower) path", project)
        return None
    return head


# ----------------------------------------------------------------------------------------------------
# the fused path


def _fused_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], tgt: Tensor, active: Tensor,
                cmask: Optional[Tensor], cmask_rows: Optional[Tensor], epsilon: float, rows_per_chunk: int,
                grad_x: Optional[Tensor] = None, grad_w: Optional[Tensor] = None, grad_b: Optional[Tensor] = None,
                row_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed CE of M independent rows `x @ weight.T + bias` (all fp32), chunk by chunk.

    Returns per-row (loss [M], nll [M], hit [M]: the target's logit is the largest); rows with `active`
    False give 0 and no gradient. Given buffers, also writes d(row loss)/dx into grad_x [M, C] and adds
    sum_rows row_scale * d(row loss)/d(weight, bias) into grad_w [V, C] and grad_b [V]. One logits buffer
    is reused for every chunk; the logits become the softmax, then d loss / d logits, in place. It holds
    them vocabulary-major ([V, rows]): on the CPU (MKL) `weight @ x.T` and the two gradient products in
    that layout ran about 20 % faster than with [rows, V], and each step is a broadcast over rows.
    """
    num_rows, vocab = x.size(0), weight.size(0)
    loss = x.new_zeros(num_rows)
    nll = x.new_zeros(num_rows)
    hit = torch.zeros(num_rows, dtype=torch.bool, device=x.device)
    want_grad = grad_x is not None or grad_w is not None or grad_b is not None
    rows = max(1, min(rows_per_chunk, num_rows))
    buf = x.new_empty(rows * vocab)
    zero = x.new_zeros(())
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        xs, t, act = x[start:end], tgt[start:end], active[start:end]
        z = torch.mm(weight, xs.t(), out=buf[: (end - start) * vocab].view(vocab, end - start))  # [V, m]
        if bias is not None:
            z.add_(bias[:, None])
        allowed = None
        if cmask is not None:
            rows_mask = cmask[cmask_rows[start:end]]
            rows_mask.scatter_(1, t[:, None], True)  # ignored rows may have an empty mask: keep them finite
            allowed = rows_mask.t()
            z.masked_fill_(~allowed, float("-inf"))
        z.sub_(z.amax(0))  # z - max: log-probs are z - log(sum exp)
        zt = z.gather(0, t[None]).squeeze(0)
        hit[start:end] = zt.ge(0) & act
        if epsilon > 0:
            zsum = z.sum(0) if allowed is None else torch.where(allowed, z, zero).sum(0)
        z.exp_()
        total = z.sum(0)
        log_total = total.log()
        row_nll = log_total - zt
        if allowed is None:
            k = float(vocab)
            eps_i = torch.full_like(row_nll, epsilon / (vocab - 1))
        else:
            k = allowed.sum(0).to(z.dtype)
            eps_i = epsilon / (k - 1).clamp(min=1)
        if epsilon > 0:
            row_loss = (1.0 - epsilon - eps_i) * row_nll + eps_i * (k * log_total - zsum)
        else:
            row_loss = row_nll
        loss[start:end] = torch.where(act, row_loss, zero)
        nll[start:end] = torch.where(act, row_nll, zero)
        if not want_grad:
            continue
        # d loss / d z_j = a p_j - (1 - eps - eps_i) [j = t] - eps_i [j allowed], a = 1 - eps + eps_i (k - 1)
        w = act.to(z.dtype)
        a = 1.0 - epsilon + eps_i * (k - 1)
        z.mul_(w * a / total)
        if epsilon > 0:
            step = w * eps_i
            z.sub_(step if allowed is None else torch.where(allowed, step, zero))
        z.scatter_add_(0, t[None], (-(w * (1.0 - epsilon - eps_i)))[None])
        if grad_x is not None:
            torch.mm(z.t(), weight, out=grad_x[start:end])
        if grad_w is not None or grad_b is not None:
            scale = row_scale[start:end]
            if grad_w is not None:
                grad_w.addmm_(z, xs * scale[:, None])
            if grad_b is not None:
                grad_b.addmv_(z, scale)
    return loss, nll, hit


class _Spec:
    """The non-tensor and integer inputs of one fused call, with the drop-worst choice it made."""

    def __init__(self, target, ignore_index, constraint_mask, epsilon, chunk_tokens, drop_worst_ratio, scale):
        self.target, self.ignore_index, self.constraint_mask = target, ignore_index, constraint_mask
        self.epsilon, self.chunk_tokens, self.drop_worst_ratio, self.scale = (
            epsilon, chunk_tokens, drop_worst_ratio, scale)
        self.keep = None  # [L, N] bool after a drop-worst call: the tokens each layer kept


def _scored(target: Tensor, ignore_index: Optional[int]) -> Tensor:
    return target.ne(ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)


def _drop_worst(row_loss: Tensor, scored: Tensor, ratio: float) -> Tensor:
    """[L, N] keep mask: per layer, the int(n * (1 - ratio)) scored tokens with the smallest loss."""
    k = drop_worst_keep(int(scored.sum()), ratio)
    ranked = row_loss.detach().masked_fill(~scored[None], float("inf"))
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, ranked.topk(k, dim=1, largest=False).indices, True)
    return keep


def _fused_forward(feats: Tensor, weight: Tensor, bias: Optional[Tensor], spec: _Spec,
                   need_x: bool, need_w: bool, need_b: bool):
    """Per-layer (loss, nll, correct) and the stored gradients: d loss_l / d feats_l per layer
    ([L, N, C], unscaled) and sum_l scale_l d loss_l / d (weight, bias)."""
    num_layers, num_tokens, dim = feats.shape
    # token-major rows (token i, layer l) -> i * L + l: a chunk holds all layers of its tokens
    x = feats.detach().transpose(0, 1).reshape(num_tokens * num_layers, dim).float()
    w = weight.detach().float()
    b = bias.detach().float() if bias is not None else None
    target = spec.target
    scored = _scored(target, spec.ignore_index)
    tgt = target.repeat_interleave(num_layers)
    active = scored.repeat_interleave(num_layers)
    cmask_rows = None
    if spec.constraint_mask is not None:
        cmask_rows = torch.arange(num_tokens, device=target.device).repeat_interleave(num_layers)
    row_scale = spec.scale.to(x.device).repeat(num_tokens)
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros_like(w) if need_w else None
    grad_b = torch.zeros_like(b) if need_b and b is not None else None
    rows_per_chunk = spec.chunk_tokens * num_layers
    loss, nll, hit = _fused_rows(x, w, b, tgt, active, spec.constraint_mask, cmask_rows, spec.epsilon,
                                 rows_per_chunk, grad_x, grad_w, grad_b, row_scale)

    def per_layer(rows: Tensor) -> Tensor:  # [N * L] token-major -> [L, N]
        return rows.view(num_tokens, num_layers).t()

    if spec.drop_worst_ratio > 0:
        keep = _drop_worst(per_layer(loss), scored, spec.drop_worst_ratio)
        spec.keep = keep
        kept = keep.t().reshape(-1)
        loss, nll = loss * kept, nll * kept
        if grad_x is not None:
            grad_x.mul_(kept[:, None])
        dropped = (active & ~kept).nonzero().flatten()
        if dropped.numel() and (grad_w is not None or grad_b is not None):
            # take the dropped rows' share out of the weight's gradient (recomputed for those rows only)
            _fused_rows(x[dropped], w, b, tgt[dropped], active[dropped], spec.constraint_mask,
                        cmask_rows[dropped] if cmask_rows is not None else None, spec.epsilon, rows_per_chunk,
                        None, grad_w, grad_b, -row_scale[dropped])
    loss_l, nll_l = per_layer(loss).sum(1), per_layer(nll).sum(1)
    correct_l = per_layer(hit).sum(1)
    grad_feats = grad_x.view(num_tokens, num_layers, dim).transpose(0, 1) if grad_x is not None else None
    return loss_l, nll_l, correct_l, grad_feats, grad_w, grad_b


class _FusedLayerwiseLoss(torch.autograd.Function):
    """loss_l, nll_l = label-smoothed CE of linear(feats_l) per layer; gradients made in forward.

    Backward scales d loss_l / d feats_l by the incoming grad of loss_l and the stored weight gradient
    (made for the layer weights `spec.scale`) by c, where the incoming grad is c * scale (what
    mean_over_layers gives). Any other incoming grad (other layer weights, a grad of nll) is answered
    exactly by recomputing with autograd.
    """

    @staticmethod
    def forward(ctx, feats, weight, bias, spec):
        ctx.set_materialize_grads(False)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=feats.device.type, enabled=False):  # fp32 throughout, also under AMP
            loss_l, nll_l, correct_l, gx, gw, gb = _fused_forward(feats, weight, bias, spec, need_x, need_w, need_b)
        ctx.spec, ctx.stored = spec, [gx, gw, gb]
        ctx.save_for_backward(feats, weight, bias)
        ctx.mark_non_differentiable(correct_l)
        return loss_l, nll_l, correct_l

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_nll, _grad_correct):
        feats, weight, bias = ctx.saved_tensors
        spec = ctx.spec
        num_layers = feats.size(0)
        scale = spec.scale.to(feats.device)
        g = grad_loss.float() if grad_loss is not None else scale.new_zeros(num_layers)
        c = (g * scale).sum() / (scale * scale).sum()
        fits = bool(torch.allclose(g, c * scale, rtol=1e-5, atol=0.0))
        if grad_nll is not None and bool(grad_nll.ne(0).any()):
            fits = False
        if not fits:
            ctx.stored = None
            return (*_recomputed_grads(ctx, feats, weight, bias, spec, grad_loss, grad_nll), None)
        gx, gw, gb = ctx.stored
        ctx.stored = None
        if gx is not None:
            gx = gx.mul_(g.view(num_layers, 1, 1)).to(feats.dtype)
        if gw is not None:
            gw = gw.mul_(c).to(weight.dtype)
        if gb is not None:
            gb = gb.mul_(c).to(bias.dtype)
        return gx, gw, gb, None


def _recomputed_grads(ctx, feats, weight, bias, spec, grad_loss, grad_nll):
    """Exact gradients for any incoming grads: autograd over the checkpointed path, same kept tokens."""
    with torch.enable_grad():
        f = feats.detach().requires_grad_(ctx.needs_input_grad[0])
        w = weight.detach().requires_grad_(ctx.needs_input_grad[1])
        b = bias.detach().requires_grad_(ctx.needs_input_grad[2]) if bias is not None else None
        loss_l, nll_l = _checkpointed(f, lambda s: F.linear(s, w, b), spec, keep=spec.keep)[:2]
        inputs = [t for t in (f, w, b) if t is not None and t.requires_grad]
        outputs = [o for o, g in ((loss_l, grad_loss), (nll_l, grad_nll)) if g is not None]
        grads = [g for g in (grad_loss, grad_nll) if g is not None]
        got = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True)) if outputs else iter(())
    return [next(got, None) if t is not None and t.requires_grad else None for t in (f, w, b)]


# ----------------------------------------------------------------------------------------------------
# the checkpointed path (any `project`)


def _chunk_rows(states: Tensor, target: Tensor, constraint_mask: Optional[Tensor],
                project: Callable[[Tensor], Tensor], epsilon: float,
                ignore_index: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-layer, per-token values over one chunk: (smoothed loss [L, n], nll [L, n], hit [L, n])."""
    logits = project(states)  # [L, n, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in fp32, as fairseq's get_normalized_probs
    vocab = logits.size(-1)
    if constraint_mask is not None:
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
    hit = lprobs.argmax(-1).eq(target.unsqueeze(0))
    if ignore_index is not None:
        drop = target.eq(ignore_index).unsqueeze(0)
        loss, nll = loss.masked_fill(drop, 0.0), nll.masked_fill(drop, 0.0)
        hit = hit & ~drop
    return loss, nll, hit


def _checkpointed(states: Tensor, project, spec: _Spec, keep: Optional[Tensor] = None):
    """Per-layer sums with plain autograd, each chunk checkpointed when there are several; drop-worst
    keeps `keep` if given (the tokens a fused forward kept), else chooses."""
    num_tokens = states.size(1)
    chunk = spec.chunk_tokens
    use_checkpoint = torch.is_grad_enabled() and num_tokens > chunk
    parts: List[Tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        mask = spec.constraint_mask[start:end] if spec.constraint_mask is not None else None
        args = (states[:, start:end], spec.target[start:end], mask, project, spec.epsilon, spec.ignore_index)
        parts.append(checkpoint(_chunk_rows, *args, use_reentrant=False) if use_checkpoint else _chunk_rows(*args))
    loss, nll, hit = (torch.cat(p, dim=1) for p in zip(*parts))
    if keep is None and spec.drop_worst_ratio > 0:
        keep = _drop_worst(loss, _scored(spec.target, spec.ignore_index), spec.drop_worst_ratio)
        spec.keep = keep
    if keep is not None:
        loss, nll = loss * keep, nll * keep
    return loss.sum(1), nll.sum(1), hit.sum(1)


# ----------------------------------------------------------------------------------------------------


def layerwise_label_smoothed_nll(
    states: Tensor,
    project: Callable[[Tensor], Tensor],
    target: Tensor,
    epsilon: float,
    ignore_index: Optional[int],
    constraint_mask: Optional[Tensor] = None,
    chunk_tokens: Optional[int] = None,
    drop_worst_ratio: float = 0.0,
    layer_weights: Optional[Sequence[float]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed NLL of every layer's states, summed over tokens.

    states: [L, N, C] decoder states of the N scored target tokens (select non-pad tokens first).
    project: maps [*, C] -> [*, V] (final LayerNorm + output projection).
    target: [N] token ids; rows equal to `ignore_index` contribute nothing.
    constraint_mask: [N, V] bool, allowed output tokens per row (logits elsewhere are -inf).
    chunk_tokens: tokens per chunk; None or 0 picks it from a 256 MB budget of fp32 logits.
    drop_worst_ratio: OFA's drop-worst per layer: each layer's loss and nll sum only its
      int(n * (1 - ratio)) lowest-loss scored tokens (n = tokens not equal to ignore_index).
    layer_weights: the weights the caller will average the layers with (`mean_over_layers`); the fused
      path stores the weight's gradient for them. Other weights are still exact, only slower.
    Returns (loss_per_layer [L], nll_per_layer [L], correct_per_layer [L]); the first two are fp32
    sums (differentiable; fp32 at least), the last integer counts of argmax hits over all scored tokens.
    """
    if states.dim() != 3:
        raise ValueError(f"states must be [L, N, C], got shape {tuple(states.shape)}")
    num_layers, num_tokens = states.size(0), states.size(1)
    if target.shape != (num_tokens,):
        raise ValueError(f"target must be [N]={num_tokens}, got shape {tuple(target.shape)}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must lie in [0, 1), got {epsilon}")
    if not 0.0 <= drop_worst_ratio < 1.0:
        raise ValueError(f"drop-worst ratio must lie in [0, 1), got {drop_worst_ratio}")
    scale = layer_scale(num_layers, layer_weights)
    if constraint_mask is not None:
        if constraint_mask.dim() != 2 or constraint_mask.size(0) != num_tokens:
            raise ValueError(f"constraint_mask must be [N={num_tokens}, V], "
                             f"got shape {tuple(constraint_mask.shape)}")
        constraint_mask = constraint_mask.bool()
        scored = _scored(target, ignore_index)
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

    probe = states[:1, :1].detach()
    with torch.no_grad():
        probe_logits = project(probe)
    vocab = probe_logits.size(-1)
    if int(target.max()) >= vocab or int(target.min()) < 0:
        raise ValueError(f"target ids must lie in [0, {vocab}) (the projection's vocabulary size); "
                         f"got min {int(target.min())}, max {int(target.max())}")
    if constraint_mask is not None and constraint_mask.size(-1) != vocab:
        raise ValueError(f"constraint_mask has {constraint_mask.size(-1)} columns but the "
                         f"projection gives {vocab} logits")
    spec = _Spec(target, ignore_index, constraint_mask, epsilon, chunk_tokens or auto_chunk_tokens(num_layers, vocab),
                 drop_worst_ratio, scale)

    head = _verified_head(project, probe, probe_logits)
    if head is None:
        return _checkpointed(states, project, spec)
    features, weight, bias = head
    feats = features(states)  # [L, N, C]: autograd (the final LayerNorm) up to the projection
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, weight, bias)):
        return _FusedLayerwiseLoss.apply(feats, weight, bias, spec)
    with torch.no_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
        return _fused_forward(feats, weight, bias, spec, False, False, False)[:3]


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
