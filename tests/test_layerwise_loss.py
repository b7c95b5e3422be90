"""The layer-wise loss equals a naive per-layer loop over fairseq's label_smoothed_nll_loss."""
import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from mue.criterions.layerwise_loss import (auto_chunk_tokens, layerwise_label_smoothed_nll,
                                           mean_over_layers)

PAD = 1
L, N, C, V = 3, 11, 8, 13


def make_inputs(seed=0):
    torch.manual_seed(seed)
    project = torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, V, bias=False))
    states = torch.randn(L, N, C, requires_grad=True)
    target = torch.randint(2, V, (N,))
    return states, project, target


def grads(loss, states, project):
    states.grad = None
    project.zero_grad()
    loss.backward()
    return [states.grad.clone()] + [p.grad.clone() for p in project.parameters()]


def naive(states, project, target, eps):
    """Mean over layers of fairseq's label-smoothed loss, one full projection per layer."""
    losses, nlls = [], []
    for layer in range(states.size(0)):
        lprobs = F.log_softmax(project(states[layer]), dim=-1)
        loss, nll = label_smoothed_nll_loss(lprobs, target, eps, ignore_index=PAD)
        losses.append(loss)
        nlls.append(nll)
    return torch.stack(losses), torch.stack(nlls)


@pytest.mark.parametrize("chunk", [None, 1, 4, N])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive_loop_in_value_and_gradient(chunk, eps):
    states, project, target = make_inputs()
    target[3] = PAD  # a pad row inside the batch is ignored by both
    ref_loss, ref_nll = naive(states, project, target, eps)
    ref_grads = grads(ref_loss.mean(), states, project)

    loss_l, nll_l, correct_l = layerwise_label_smoothed_nll(states, project, target, eps, PAD,
                                                            chunk_tokens=chunk)
    torch.testing.assert_close(loss_l, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll_l, ref_nll, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(loss_l.mean(), states, project), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        hits = project(states).argmax(-1).eq(target) & target.ne(PAD)
    assert correct_l.tolist() == hits.sum(-1).tolist()


def test_chunked_equals_unchunked_and_checkpoints():
    states, project, target = make_inputs(1)
    whole = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=N)
    g_whole = grads(whole[0].sum(), states, project)
    calls = []
    project.register_forward_hook(lambda *args: calls.append(1))
    chunked = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=3)
    assert len(calls) == 4  # ceil(11 / 3) chunks, each projecting all layers at once
    g_chunked = grads(chunked[0].sum(), states, project)
    assert len(calls) == 8  # checkpointing re-runs each chunk's projection in backward
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_whole, g_chunked):
        torch.testing.assert_close(a, b)


def test_checkpointed_chunks_keep_no_logits_for_backward():
    """Memory: with several chunks, autograd keeps only the chunks' states, never [L, n, V] logits."""
    def saved_sizes(chunk):
        states, project, target = make_inputs()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layerwise_label_smoothed_nll(states, project, target, 0.1, PAD, chunk_tokens=chunk)
        return sizes

    assert max(saved_sizes(N)) == L * N * V  # one chunk: plain autograd keeps the logits
    assert max(saved_sizes(2)) < L * 2 * V  # checkpointed: not even one chunk's logits are kept


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


def constrained_reference(states, project, target, mask, eps):
    """OFA's constrained loss written out for one layer at a time."""
    losses = []
    for layer in range(states.size(0)):
        lprobs = F.log_softmax(project(states[layer]).masked_fill(~mask, float("-inf")), dim=-1)
        nll = -lprobs.gather(1, target[:, None]).squeeze(1)
        smooth = -lprobs.masked_fill(~mask, 0.0).sum(-1)
        eps_i = eps / (mask.sum(-1) - 1)
        losses.append(((1 - eps - eps_i) * nll + eps_i * smooth).sum())
    return torch.stack(losses)


def test_constraint_mask_smooths_over_allowed_tokens_only():
    states, project, target = make_inputs(3)
    mask = torch.zeros(N, V, dtype=torch.bool)
    mask[:, 4:8] = True
    target = torch.randint(4, 8, (N,))
    loss_l, _, correct_l = layerwise_label_smoothed_nll(states, project, target, 0.1, PAD,
                                                        constraint_mask=mask, chunk_tokens=5)
    torch.testing.assert_close(loss_l, constrained_reference(states, project, target, mask, 0.1))

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
