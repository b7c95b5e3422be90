"""Criterion `mue` on a tiny fake encoder-decoder that follows CONTRACT.md's model interface."""
import argparse
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions import CRITERION_REGISTRY, build_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (LabelSmoothedCrossEntropyCriterion,
                                                             label_smoothed_nll_loss)
from fairseq.data import Dictionary
from fairseq.logging import metrics
from fairseq.models import BaseFairseqModel, FairseqDecoder
from omegaconf import OmegaConf

import mue.criterions  # noqa: F401  (registers "mue")
from mue.criterions import layerwise_loss
from mue.criterions.mue import MueCriterion

C, LAYERS, B, T = 8, 3, 3, 5


def tiny_dictionary(size=20):
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


class TinyDecoder(FairseqDecoder):
    """Embedding + residual tanh(Linear) layers + final LayerNorm + tied output projection, with
    mue_ofa's `project` = output_projection(layer_norm(x)) (the layer-wise loss's fused path)."""

    def __init__(self, dictionary):
        super().__init__(dictionary)
        self.embed_tokens = torch.nn.Embedding(len(dictionary), C, padding_idx=dictionary.pad())
        self.layers = torch.nn.ModuleList(torch.nn.Linear(C, C) for _ in range(LAYERS))
        self.layer_norm = torch.nn.LayerNorm(C)
        self.output_projection = torch.nn.Linear(C, len(dictionary), bias=False)
        self.output_projection.weight = self.embed_tokens.weight  # tied, as in mue_ofa

    def project(self, x):
        return self.output_projection(self.layer_norm(x))

    def forward(self, prev_output_tokens, context):
        x = (self.embed_tokens(prev_output_tokens) + context[:, None]).transpose(0, 1)  # T x B x C
        inner_states = [x]
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
            inner_states.append(x)
        return self.project(x).transpose(0, 1), {"inner_states": inner_states}


class TinyModel(BaseFairseqModel):
    def __init__(self, dictionary):
        super().__init__()
        self.decoder = TinyDecoder(dictionary)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens=False, **unused):
        context = self.decoder.embed_tokens(src_tokens).mean(1)
        logits, extra = self.decoder(prev_output_tokens, context)
        if not return_all_hiddens:
            extra = {"inner_states": None}
        return logits, extra


def make_sample(dictionary, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad, V = dictionary.pad(), len(dictionary)
    target = torch.randint(4, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 1])
    for row, n in enumerate(lengths.tolist()):
        target[row, n:] = pad
    prev = torch.full_like(target, pad)
    prev[:, 0] = dictionary.bos()
    prev[:, 1:] = target[:, :-1]
    prev[target.eq(pad)] = pad
    return {
        "id": torch.arange(B), "nsentences": B, "ntokens": int(target.ne(pad).sum()),
        "net_input": {"src_tokens": torch.randint(4, V, (B, 4), generator=g),
                      "src_lengths": torch.full((B,), 4), "prev_output_tokens": prev},
        "target": target,
    }


@pytest.fixture
def setup():
    torch.manual_seed(0)
    dictionary = tiny_dictionary()
    task = SimpleNamespace(target_dictionary=dictionary)
    return dictionary, task, TinyModel(dictionary), make_sample(dictionary)


def per_layer_reference(model, sample, eps, pad):
    """Naive: project each layer's full B x T states, fairseq's loss per layer."""
    _, extra = model(**sample["net_input"], return_all_hiddens=True)
    target = sample["target"].reshape(-1)
    out = []
    for states in extra["inner_states"][1:]:
        lprobs = F.log_softmax(model.decoder.project(states.transpose(0, 1)), -1)
        out.append(label_smoothed_nll_loss(lprobs.view(target.numel(), -1), target, eps, ignore_index=pad))
    return out


def test_registered_and_built_from_config(setup):
    _, task, _, _ = setup
    assert CRITERION_REGISTRY["mue"] is MueCriterion
    cfg = OmegaConf.create({"_name": "mue", "label_smoothing": 0.1, "layer_weights": "1,2,1"})
    crit = build_criterion(cfg, task)
    assert isinstance(crit, MueCriterion)
    assert crit.eps == 0.1 and crit.layer_weights == [1.0, 2.0, 1.0] and crit.report_accuracy
    assert not build_criterion(OmegaConf.create({"_name": "mue", "no_report_accuracy": True}), task).report_accuracy


def test_command_line_options():
    parser = argparse.ArgumentParser()
    MueCriterion.add_args(parser)
    args = parser.parse_args(["--label-smoothing", "0.1", "--layer-weights", "1,2", "--last-layer-only",
                              "--ignore-prefix-size", "1", "--chunk-tokens", "64", "--drop-worst-ratio", "0.2",
                              "--drop-worst-after", "6000"])
    assert (args.label_smoothing, args.layer_weights, args.last_layer_only, args.ignore_prefix_size,
            args.chunk_tokens, args.no_report_accuracy) == (0.1, "1,2", True, 1, 64, False)
    assert (args.drop_worst_ratio, args.drop_worst_after) == (0.2, 6000)
    defaults = parser.parse_args([])
    assert (defaults.drop_worst_ratio, defaults.drop_worst_after) == (0.0, 0)
    assert parser.parse_args(["--no-report-accuracy"]).no_report_accuracy


def test_accuracy_can_be_switched_off(setup):
    _, task, model, sample = setup
    log = MueCriterion(task, no_report_accuracy=True)(model, sample)[2]
    assert "total" not in log and not any(k.startswith("n_correct") for k in log)


def test_loss_is_layer_mean_with_per_layer_logs(setup):
    dictionary, task, model, sample = setup
    crit = MueCriterion(task, label_smoothing=0.1, chunk_tokens=2)
    loss, sample_size, log = crit(model, sample)
    ref = per_layer_reference(model, sample, 0.1, dictionary.pad())
    ref_loss = torch.stack([r[0] for r in ref])
    torch.testing.assert_close(loss, ref_loss.mean())
    torch.testing.assert_close(log["nll_loss"], torch.stack([r[1] for r in ref]).mean())
    assert sample_size == sample["ntokens"] == log["ntokens"] == log["sample_size"] == 9
    assert log["nsentences"] == B
    for i in range(1, LAYERS + 1):
        torch.testing.assert_close(log[f"loss_l{i}"], ref[i - 1][0])
        torch.testing.assert_close(log[f"nll_loss_l{i}"], ref[i - 1][1])
        assert 0 <= log[f"n_correct_l{i}"] <= log["total"] == 9
    assert "loss_l0" not in log and f"loss_l{LAYERS + 1}" not in log

    # gradients reach every layer and the tied embedding
    loss.backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in model.decoder.layers)
    ref_grads = torch.autograd.grad(ref_loss.mean(), list(model.parameters()))
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_weights", [None, "0,1,3"])
def test_gradients_come_from_the_fused_forward(setup, monkeypatch, layer_weights):
    """With the criterion's own layer weights, backward scales the stored gradients: the checkpointed
    path (forward or the exact fallback in backward) never runs, and the gradients equal the naive loop's."""
    dictionary, task, model, sample = setup

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpointed path ran")

    monkeypatch.setattr(layerwise_loss, "_checkpointed", forbidden)
    crit = MueCriterion(task, label_smoothing=0.1, layer_weights=layer_weights)
    loss, _, _ = crit(model, sample)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = torch.stack([r[0] for r in per_layer_reference(model, sample, 0.1, dictionary.pad())])
    weights = torch.tensor([1.0, 1.0, 1.0] if layer_weights is None else [0.0, 1.0, 3.0])
    (ref * weights / weights.sum()).sum().backward()
    for p, g in zip(model.parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-6)


def test_layer_weights_weight_the_mean(setup):
    _, task, model, sample = setup
    logs = MueCriterion(task)(model, sample)[2]
    weighted, _, _ = MueCriterion(task, layer_weights="0,1,3")(model, sample)
    expected = (logs["loss_l2"] + 3 * logs["loss_l3"]) / 4
    torch.testing.assert_close(weighted, expected)
    with pytest.raises(ValueError, match="has 2 values but the decoder has 3 layers"):
        MueCriterion(task, layer_weights="1,1")(model, sample)
    with pytest.raises(ValueError, match="'x' in '1,x' is not a number"):
        MueCriterion(task, layer_weights="1,x")
    with pytest.raises(ValueError, match="exclude each other"):
        MueCriterion(task, layer_weights="1,1,1", last_layer_only=True)


def test_last_layer_only_equals_fairseq_label_smoothed_cross_entropy(setup):
    _, task, model, sample = setup
    ours, ours_size, ours_log = MueCriterion(task, label_smoothing=0.1, last_layer_only=True)(model, sample)
    fairseq_crit = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1,
                                                      report_accuracy=True)
    theirs, theirs_size, theirs_log = fairseq_crit(model, sample)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_log["nll_loss"], theirs_log["nll_loss"])
    assert ours_size == theirs_size
    assert ours_log["n_correct"] == theirs_log["n_correct"] and ours_log["total"] == theirs_log["total"]
    assert set(k for k in ours_log if k.startswith("loss_l")) == {f"loss_l{LAYERS}"}


def test_ignore_prefix_and_constraint_masks(setup):
    dictionary, task, model, sample = setup
    V = len(dictionary)
    mask = torch.zeros(B, T, V, dtype=torch.bool)
    mask[..., 4:10] = True
    sample["target"] = sample["target"].masked_fill(sample["target"].ne(dictionary.pad()),
                                                    7)  # every real target allowed
    sample["constraint_masks"] = mask
    loss, size, log = MueCriterion(task, ignore_prefix_size=1)(model, sample)
    assert size == 9 - B  # the first token of each row is skipped

    _, extra = model(**sample["net_input"], return_all_hiddens=True)
    target = sample["target"][:, 1:]
    keep = target.ne(dictionary.pad())
    expected = []
    for states in extra["inner_states"][1:]:
        logits = model.decoder.project(states.transpose(0, 1))[:, 1:][keep]
        lprobs = F.log_softmax(logits.masked_fill(~mask[:, 1:][keep], -math.inf), -1)
        expected.append(-lprobs.gather(1, target[keep][:, None]).sum())
    torch.testing.assert_close(loss, torch.stack(expected).mean())

    sample["target"][0, 2] = 12  # outside the allowed 4..9
    with pytest.raises(ValueError, match="outside its constraint mask"):
        MueCriterion(task)(model, sample)


def test_reduce_metrics_gives_per_layer_meters(setup):
    _, task, model, sample = setup
    crit = MueCriterion(task, label_smoothing=0.1)
    logs = [crit(model, sample)[2], crit(model, make_sample(task.target_dictionary, seed=1))[2]]
    with metrics.aggregate() as agg:
        MueCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    tokens = sum(log["ntokens"] for log in logs)
    assert values["loss"] == pytest.approx(sum(float(l["loss"]) for l in logs) / tokens / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["nll_loss"], rel=1e-2)
    for i in range(1, LAYERS + 1):
        want = sum(float(l[f"nll_loss_l{i}"]) for l in logs) / tokens / math.log(2)
        assert values[f"nll_loss_l{i}"] == pytest.approx(want, abs=1e-3)
        assert f"loss_l{i}" in values
        acc = 100.0 * sum(l[f"n_correct_l{i}"] for l in logs) / tokens
        assert values[f"accuracy_l{i}"] == pytest.approx(acc, abs=1e-3)
    assert values["accuracy"] == values[f"accuracy_l{LAYERS}"]
    assert MueCriterion.logging_outputs_can_be_summed()


def test_model_without_inner_states_is_rejected(setup):
    _, task, model, sample = setup

    class NoStates(torch.nn.Module):
        decoder = model.decoder

        def forward(self, **kwargs):
            return model(**{k: v for k, v in kwargs.items() if k != "return_all_hiddens"})

    with pytest.raises(ValueError, match="needs extra\\['inner_states'\\]"):
        MueCriterion(task)(NoStates(), sample)


def drop_worst_reference(model, sample, eps, pad, ratio):
    """Per layer: OFA's label_smoothed_nll_loss with drop-worst (topk of the smallest token losses)."""
    _, extra = model(**sample["net_input"], return_all_hiddens=True)
    target = sample["target"]
    keep = target.ne(pad)
    losses, nlls = [], []
    for states in extra["inner_states"][1:]:
        lprobs = F.log_softmax(model.decoder.project(states.transpose(0, 1))[keep], -1)
        loss, nll = label_smoothed_nll_loss(lprobs, target[keep], eps, ignore_index=None, reduce=False)
        loss, index = torch.topk(loss, k=int(loss.numel() * (1 - ratio)), largest=False)
        losses.append(loss.sum())
        nlls.append(nll[index].sum())
    return torch.stack(losses), torch.stack(nlls)


def test_drop_worst_after_the_given_update_count(setup):
    dictionary, task, model, sample = setup
    crit = MueCriterion(task, label_smoothing=0.1, drop_worst_ratio=0.3, drop_worst_after=100)
    full, full_size, full_log = MueCriterion(task, label_smoothing=0.1)(model, sample)

    crit.set_num_updates(100)  # OFA: update_num > drop_worst_after
    loss, size, log = crit(model, sample)
    torch.testing.assert_close(loss, full)
    assert size == full_size == 9

    crit.set_num_updates(101)
    loss, size, log = crit(model, sample)
    ref_loss, ref_nll = drop_worst_reference(model, sample, 0.1, dictionary.pad(), 0.3)
    assert size == log["sample_size"] == int(9 * 0.7) == 6 and log["ntokens"] == 9
    torch.testing.assert_close(loss, ref_loss.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log["nll_loss"], ref_nll.mean(), rtol=1e-6, atol=1e-6)
    for i in range(1, LAYERS + 1):
        torch.testing.assert_close(log[f"loss_l{i}"], ref_loss[i - 1], rtol=1e-6, atol=1e-6)
        assert log[f"n_correct_l{i}"] == full_log[f"n_correct_l{i}"]  # accuracy over every token
    assert log["total"] == 9
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_loss.mean().backward()
    for p, g in zip(model.parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-6)

    # update_num= (OFA's criterion signature) overrides the stored count
    torch.testing.assert_close(crit(model, sample, update_num=5)[0], full)
    # never in evaluation (OFA validates with update_num 0)
    model.eval()
    assert crit(model, sample)[1] == 9


def test_drop_worst_needs_the_update_count(setup):
    _, task, model, sample = setup
    crit = MueCriterion(task, drop_worst_ratio=0.2)
    with pytest.raises(ValueError, match="set_num_updates"):
        crit(model, sample)
    with pytest.raises(ValueError, match="--drop-worst-ratio must lie in"):
        MueCriterion(task, drop_worst_ratio=1.0)
    cfg = OmegaConf.create({"_name": "mue", "drop_worst_ratio": 0.2, "drop_worst_after": 6000})
    built = build_criterion(cfg, task)
    assert (built.drop_worst_ratio, built.drop_worst_after) == (0.2, 6000)


def test_reduce_metrics_divide_by_kept_tokens(setup):
    dictionary, task, model, sample = setup
    crit = MueCriterion(task, drop_worst_ratio=0.3)
    crit.set_num_updates(1)
    log = crit(model, sample)[2]
    with metrics.aggregate() as agg:
        MueCriterion.reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert log["sample_size"] == 6
    assert values["loss"] == pytest.approx(float(log["loss"]) / 6 / math.log(2), abs=1e-3)
    assert values["nll_loss"] == pytest.approx(float(log["nll_loss"]) / 6 / math.log(2), abs=1e-3)
    assert values["nll_loss_l1"] == pytest.approx(float(log["nll_loss_l1"]) / 6 / math.log(2), abs=1e-3)
