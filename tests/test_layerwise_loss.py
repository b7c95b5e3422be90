"""The layer-wise loss equals a naive per-layer loop over fairseq's label_smoothed_nll_loss.

The fused path (project = linear(features(x))) and the checkpointed path (any other project) are both
checked against the naive loop in value and gradient, with label smoothing, ignored (pad) rows,
constraint masks, layer weights and OFA's drop-worst; and the fused path is checked to compute the
vocabulary projection once, in the forward pass, with one weight-sized gradient buffer.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from torch.utils._python_dispatch import TorchDispatchMode

from mue.criterions import layerwise_loss
from mue.criterions.layerwise_loss import (auto_chunk_tokens, drop_worst_keep, layerwise_label_smoothed_nll,
                                           linear_head, mean_over_layers)

PAD = 1
L, N, C, V = 3, 11, 8, 13
TOL = dict(rtol=1e-6, atol=1e-6)  # fp32, against the naive loop


def make_inputs(seed=0, bias=False):
    torch.manual_seed(seed)
    project = torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, V, bias=bias))
    with torch.no_grad():  # LayerNorm's affine away from (1, 0), so its gradients are checked too
        project[0].weight.uniform_(0.5, 1.5)
        project[0].bias.uniform_(-0.5, 0.5)
    states = torch.randn(L, N, C, requires_grad=True)
    target = torch.randint(2, V, (N,))
    return states, project, target


def grads(loss, states, project):
    states.grad = None
    project.zero_grad()
    loss.backward()
    return [states.grad.clone()] + [p.grad.clone() for p in project.parameters()]


def naive(states, project, target, eps, mask=None, drop=0.0):
    """Per layer: full projection of the non-pad rows, fairseq's (or OFA's constrained) label-smoothed
    loss per token, OFA's drop-worst (topk of the smallest losses), then sums."""
    scored = target.ne(PAD)
    t = target[scored]
    losses, nlls = [], []
    for layer in range(states.size(0)):
        logits = project(states[layer])[scored]
        if mask is None:
            lprobs = F.log_softmax(logits, dim=-1)
            loss, nll = label_smoothed_nll_loss(lprobs, t, eps, ignore_index=None, reduce=False)
        else:
            allowed = mask[scored]
            lprobs = F.log_softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
            nll = -lprobs.gather(1, t[:, None]).squeeze(1)
            smooth = -lprobs.masked_fill(~allowed, 0.0).sum(-1)
            eps_i = eps / (allowed.sum(-1) - 1).clamp(min=1)
            loss = (1 - eps - eps_i) * nll + eps_i * smooth
        if drop > 0:
            loss, index = torch.topk(loss, k=int(loss.numel() * (1 - drop)), largest=False)
            nll = nll[index]
        losses.append(loss.sum())
        nlls.append(nll.sum())
    return torch.stack(losses), torch.stack(nlls)


def allowed_tokens(target, seed=0):
    """A random constraint mask that allows each row's target (and, for row 0, only the target)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, V, generator=g) < 0.5
    mask[torch.arange(N), target] = True
    mask[0] = False
    mask[0, target[0]] = True
    return mask


def assert_matches_naive(states, project, target, eps, chunk=None, mask=None, weights=None, drop=0.0,
                         use_project=None):
    """Loss, nll and every gradient (states, LayerNorm, projection) equal the naive loop within TOL."""
    ref_loss, ref_nll = naive(states, project, target, eps, mask, drop)
    ref_grads = grads(mean_over_layers(ref_loss, weights), states, project)
    loss_l, nll_l, correct_l = layerwise_label_smoothed_nll(
        states, use_project or project, target, eps, PAD, constraint_mask=mask, chunk_tokens=chunk,
        drop_worst_ratio=drop, layer_weights=weights)
    torch.testing.assert_close(loss_l, ref_loss, **TOL)
    torch.testing.assert_close(nll_l, ref_nll, **TOL)
    for got, want in zip(grads(mean_over_layers(loss_l, weights), states, project), ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():
        logits = project(states)
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        hits = logits.argmax(-1).eq(target) & target.ne(PAD)
    assert correct_l.tolist() == hits.sum(-1).tolist()  # accuracy counts every token, dropped or not


@pytest.mark.parametrize("chunk", [None, 1, 4, N])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive_loop_in_value_and_gradient(chunk, eps):
    states, project, target = make_inputs()
    target[3] = PAD  # a pad row inside the batch is ignored by both
    assert_matches_naive(states, project, target, eps, chunk)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 3.0]])
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_both_paths_match_naive_loop_with_every_option(fused, chunk, weights, constrained, drop):
    """Label smoothing, a pad row, a constraint mask (one row allowing only its target), layer weights,
    a bias and drop-worst, on the fused path and on the checkpointed path (an opaque lambda)."""
    states, project, target = make_inputs(5, bias=True)
    target[6] = PAD
    mask = allowed_tokens(target) if constrained else None
    use_project = None if fused else (lambda x: project(x))
    assert (linear_head(use_project or project) is not None) == fused
    assert_matches_naive(states, project, target, 0.1, chunk, mask, weights, drop, use_project)


def test_exactness_check_catches_a_wrong_gradient(monkeypatch):
    """The comparison above can fail: a weight gradient off by one part in 10^5 is caught."""
    backward = layerwise_loss._FusedLayerwiseLoss.backward

    def skewed(ctx, *grad_outputs):
        gx, gw, gb, spec = backward(ctx, *grad_outputs)
        return gx, gw * (1 + 1e-5), gb, spec

    monkeypatch.setattr(layerwise_loss._FusedLayerwiseLoss, "backward", staticmethod(skewed))
    states, project, target = make_inputs()
    with pytest.raises(AssertionError):
        assert_matches_naive(states, project, target, 0.1)


def test_any_incoming_gradient_is_exact():
    """Gradients through one layer only, or through the nll, fall back to an exact recomputation."""
    states, project, target = make_inputs(6)
    target[2] = PAD
    for pick in (lambda loss, nll: loss[1] * 2.0 - loss[0],  # not proportional to the layer weights
                 lambda loss, nll: loss.mean() + 0.5 * nll.sum()):  # a gradient of nll
        want = grads(pick(*naive(states, project, target, 0.1)), states, project)
        loss_l, nll_l, _ = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=4)
        for got, expected in zip(grads(pick(loss_l, nll_l), states, project), want):
            torch.testing.assert_close(got, expected, **TOL)


class CountProjections(TorchDispatchMode):
    """Counts matrix products with a vocabulary-sized operand, and the weight-sized ([V, C]) tensors."""

    def __init__(self, weight):
        super().__init__()
        self.weight_ptr = weight.data_ptr()
        self.products = 0
        self.weight_sized = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            if any(isinstance(a, torch.Tensor) and V in a.shape for a in args):
                self.products += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (V, C) and t.data_ptr() != self.weight_ptr:
                self.weight_sized.add(t.data_ptr())
        return out


@pytest.mark.parametrize("chunk", [1, 3, N])
def test_projection_runs_once_per_chunk_in_forward_and_never_in_backward(chunk):
    """All layers of a chunk in one matmul, its two gradient products right after, nothing in backward;
    one [V, C] buffer for the weight's gradient, whatever the number of chunks."""
    states, project, target = make_inputs(1)
    chunks = math.ceil(N / chunk)
    with CountProjections(project[1].weight) as forward:
        loss_l, _, _ = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=chunk)
    # per chunk: logits, d/dfeatures, d/dweight; plus the probe row that reads the vocabulary size and the
    # one that checks that project is linear(features(x))
    assert forward.products == 3 * chunks + 2
    assert len(forward.weight_sized) == 1
    with CountProjections(project[1].weight) as backward:
        loss_l.mean().backward()
    assert backward.products == 0
    # the stored gradient is scaled in place and handed over as the weight's .grad: no new [V, C] tensor
    assert backward.weight_sized <= forward.weight_sized
    assert project[1].weight.grad.data_ptr() in forward.weight_sized


def test_drop_worst_recomputes_only_the_dropped_rows():
    states, project, target = make_inputs(1)
    with CountProjections(project[1].weight) as counted:
        layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=N, drop_worst_ratio=0.3)
    assert counted.products == 3 + 2 + 2  # the pass, the dropped rows' logits and their weight share, probes


def test_autograd_keeps_no_logits_for_backward():
    """Memory: autograd keeps only the features and the weight itself, never [*, V] logits."""
    for chunk in (2, N):
        states, project, target = make_inputs()
        weight = project[1].weight
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=chunk)
        assert saved
        for t in saved:
            assert V not in t.shape or t.data_ptr() == weight.data_ptr(), tuple(t.shape)


def test_frozen_weight_gets_no_gradient_and_skips_its_product():
    states, project, target = make_inputs(2)
    project[1].weight.requires_grad_(False)
    ref_loss, _ = naive(states, project, target, 0.1)
    ref = torch.autograd.grad(ref_loss.mean(), [states])[0]
    with CountProjections(project[1].weight) as counted:
        loss_l, _, _ = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=N)
    assert counted.products == 2 + 2 and not counted.weight_sized  # logits and d/dfeatures only
    loss_l.mean().backward()
    torch.testing.assert_close(states.grad, ref, **TOL)
    assert project[1].weight.grad is None


def test_no_grad_gives_the_same_values():
    states, project, target = make_inputs(3)
    with_grad = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=4)
    with torch.no_grad():
        without = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=4)
    assert not without[0].requires_grad
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b)


def test_half_precision_computes_in_fp32_and_returns_gradients_in_the_input_dtype():
    """fp16/bf16 training (GPU): losses in fp32, each gradient in its tensor's dtype, close to fp32."""
    states, project, target = make_inputs(7, bias=True)
    ref_loss, _ = naive(states, project, target, 0.1)
    low = make_inputs(7, bias=True)[1].bfloat16()  # the same weights (same seed), in bf16
    low_states = states.detach().bfloat16().requires_grad_(True)
    loss_l, _, _ = layerwise_label_smoothed_nll(low_states, low, target, 0.1, PAD, chunk_tokens=4)
    assert loss_l.dtype == torch.float32
    torch.testing.assert_close(loss_l, ref_loss, rtol=2e-2, atol=0.0)
    loss_l.mean().backward()
    assert low_states.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in low.parameters())


def test_decoder_project_is_recognised_and_checked():
    """CONTRACT.md's decoder.project = output_projection(layer_norm(x)) takes the fused path; a project
    that looks linear but is not (here: scaled) is caught by the probe and takes the checkpointed path."""
    class Decoder(torch.nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.layer_norm = torch.nn.LayerNorm(C)
            self.output_projection = torch.nn.Linear(C, V, bias=False)
            self.scale = scale

        def project(self, x):
            return self.output_projection(self.layer_norm(x)) * self.scale

    plain, scaled = Decoder(), Decoder(scale=2.0)
    assert linear_head(plain.project)[1] is plain.output_projection.weight
    states, _, target = make_inputs(4)
    probe = states[:1, :1].detach()
    for decoder in (plain, scaled):
        head = layerwise_loss._verified_head(decoder.project, probe, decoder.project(probe))
        assert (head is not None) == (decoder is plain)
        ref_loss, _ = naive(states, decoder.project, target, 0.1)
        ref = torch.autograd.grad(ref_loss.mean(), [states, decoder.output_projection.weight])
        loss_l, _, _ = layerwise_label_smoothed_nll(states, decoder.project, target, 0.1, PAD, chunk_tokens=4)
        torch.testing.assert_close(loss_l, ref_loss, **TOL)
        got = torch.autograd.grad(loss_l.mean(), [states, decoder.output_projection.weight])
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **TOL)


def test_padding_rows_change_nothing():
    states, project, target = make_inputs(2)
    base = layerwise_label_smoothed_nll(states[:, :6], project, target[:6], 0.1, PAD)
    padded_target = target.clone()
    padded_target[6:] = PAD
    padded = layerwise_label_smoothed_nll(states, project, padded_target, 0.1, PAD, chunk_tokens=2)
    for a, b in zip(base, padded):
        torch.testing.assert_close(a, b)
    padded[0].sum().backward()
    assert states.grad[:, 6:].abs().max() == 0
    assert states.grad[:, :6].abs().max() > 0


def test_constraint_mask_smooths_over_allowed_tokens_only():
    states, project, target = make_inputs(3)
    mask = torch.zeros(N, V, dtype=torch.bool)
    mask[:, 4:8] = True
    target = torch.randint(4, 8, (N,))
    loss_l, _, correct_l = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD,
                                                        constraint_mask=mask, chunk_tokens=5)
    torch.testing.assert_close(loss_l, naive(states, project, target, 0.1, mask)[0], **TOL)

    # disallowed tokens get no probability: their weights neither change the loss nor get gradient
    loss_l.sum().backward()
    weight = project[1].weight
    assert weight.grad[~mask[0]].abs().max() == 0
    assert weight.grad[mask[0]].abs().max() > 0
    with torch.no_grad():
        weight[~mask[0]] += 100.0
    again, _, correct_again = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD,
                                                           constraint_mask=mask)
    torch.testing.assert_close(again, loss_l)
    assert correct_again.tolist() == correct_l.tolist()


def test_constraint_mask_rejects_disallowed_target_and_tolerates_empty_pad_rows():
    states, project, target = make_inputs(4)
    mask = torch.ones(N, V, dtype=torch.bool)
    mask[5, target[5]] = False
    with pytest.raises(ValueError, match=r"outside its constraint mask at token rows \[5\]"):
        layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, constraint_mask=mask)
    target[5] = PAD
    mask[5] = False  # an ignored row with nothing allowed must not produce NaN
    loss_l, nll_l, _ = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD,
                                                    constraint_mask=mask, chunk_tokens=4)
    loss_l.sum().backward()
    assert torch.isfinite(loss_l).all() and torch.isfinite(states.grad).all()


# ---------------------------------------------------------------- drop-worst on crafted losses

def crafted(scores):
    """Identity projection, target 0 everywhere, logits (a, 0, 0, 0): token loss log(1 + 3 exp(-a))
    falls as a rises, so the tokens with the smallest a are the worst."""
    scores = torch.tensor(scores, dtype=torch.float32)
    states = torch.zeros(*scores.shape, 4)
    states[..., 0] = scores
    states.requires_grad_(True)
    project = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        project.weight.copy_(torch.eye(4))
    return states, project, torch.zeros(scores.shape[1], dtype=torch.long)


def token_loss(a):
    return math.log(1 + 3 * math.exp(-a))


@pytest.mark.parametrize("fused", [True, False])
def test_drop_worst_leaves_out_each_layers_own_worst_tokens(fused):
    good = [5.0 + 0.1 * i for i in range(10)]
    layer0 = list(good)
    layer0[2], layer0[5] = -3.0, -2.0  # layer 0's worst: tokens 2 and 5
    layer1 = list(good)
    layer1[0], layer1[7] = -4.0, -1.0  # layer 1's worst: tokens 0 and 7
    states, project, target = crafted([layer0, layer1])
    use = project if fused else (lambda x: project(x))
    assert drop_worst_keep(10, 0.2) == 8
    loss_l, nll_l, correct_l = layerwise_label_smoothed_nll(states, use, target, 0.0, PAD, drop_worst_ratio=0.2)
    values, nlls = loss_l.detach(), nll_l.detach()
    for layer, scores, dropped in ((0, layer0, {2, 5}), (1, layer1, {0, 7})):
        want = sum(token_loss(a) for i, a in enumerate(scores) if i not in dropped)
        assert float(values[layer]) == pytest.approx(want, rel=1e-5)  # fp32 log(1 + x), x ~ 0.02
        assert float(nlls[layer]) == pytest.approx(want, rel=1e-5)
    assert correct_l.tolist() == [8, 8]  # accuracy still counts every token (the dropped ones are wrong)
    loss_l.sum().backward()
    grad_norm = states.grad.norm(dim=-1)
    assert grad_norm[0, [2, 5]].max() == 0 and grad_norm[1, [0, 7]].max() == 0
    assert grad_norm[0, [0, 7]].min() > 0 and grad_norm[1, [2, 5]].min() > 0


def test_drop_worst_rounds_as_ofa_and_ignores_pad_rows():
    assert [drop_worst_keep(10, r) for r in (0.0, 0.01, 0.05, 0.2, 0.5)] == [10, 9, 9, 8, 5]
    assert drop_worst_keep(1, 0.05) == 0  # OFA's int(): a one-token batch keeps nothing
    # pad rows are neither ranked nor counted: 6 scored tokens at ratio 0.2 keep int(4.8) = 4
    scores = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]]
    states, project, target = crafted(scores)
    target[6:] = PAD
    loss_l, _, _ = layerwise_label_smoothed_nll(states, project, target, 0.0, PAD, drop_worst_ratio=0.2)
    assert float(loss_l[0].detach()) == pytest.approx(sum(token_loss(a) for a in (3.0, 4.0, 5.0, 6.0)), rel=1e-5)


def test_drop_worst_ratio_is_checked():
    states, project, target = make_inputs()
    with pytest.raises(ValueError, match="drop-worst ratio must lie in"):
        layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, drop_worst_ratio=1.0)


# ---------------------------------------------------------------- inputs and helpers

def test_bad_shapes_and_ids_raise():
    states, project, target = make_inputs()
    with pytest.raises(ValueError, match="states must be"):
        layerwise_label_smoothed_nll(states[0], project, target, 0.1, PAD)
    with pytest.raises(ValueError, match="target must be"):
        layerwise_label_smoothed_nll(states, project, target[:-1], 0.1, PAD)
    target[0] = V
    with pytest.raises(ValueError, match="target ids must lie in"):
        layerwise_label_smoothed_nll(states, project, target, 0.1, PAD)


def test_no_tokens_still_backpropagates():
    states, project, _ = make_inputs()
    loss_l, nll_l, correct_l = layerwise_label_smoothed_nll(
        states[:, :0], project, torch.zeros(0, dtype=torch.long), 0.1, PAD)
    assert loss_l.shape == (L,) and loss_l.sum().item() == 0 and correct_l.sum().item() == 0
    loss_l.sum().backward()
    assert states.grad is not None


def test_mean_over_layers_and_chunk_budget():
    values = torch.tensor([1.0, 2.0, 6.0])
    assert mean_over_layers(values).item() == pytest.approx(3.0)
    assert mean_over_layers(values, [1, 0, 1]).item() == pytest.approx(3.5)
    assert mean_over_layers(values, [0, 0, 2]).item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="2 layer weights for 3 layers"):
        mean_over_layers(values, [1, 1])
    # 6 layers x 59,457 vocab x 4 bytes per token: a 256 MB budget holds 188 tokens
    assert auto_chunk_tokens(6, 59457) == (256 * 2**20) // (4 * 6 * 59457)
    assert auto_chunk_tokens(6, 59457) * 6 * 59457 * 4 <= 256 * 2**20
    assert auto_chunk_tokens(100, 10**9) == 1
