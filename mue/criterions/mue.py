"""fairseq criterion `mue`: the layer-wise label-smoothed cross-entropy of MuE (paper Eq. 12).

The model is run with `return_all_hiddens=True`; the outputs of decoder layers 1..L
(`extra["inner_states"][1:]`, before the final LayerNorm) are gathered at the scored target positions
and projected with `model.decoder.project` in one chunked call (see `layerwise_loss`). The training
loss is the (optionally weighted) mean over layers of the per-layer loss sums; every layer's loss,
NLL and accuracy are logged as `loss_l{i}`, `nll_loss_l{i}`, `accuracy_l{i}` (i = layer number).

OFA's drop-worst (`--drop-worst-ratio R --drop-worst-after U`, caption stage 1): once the update count
exceeds U, each layer's loss and NLL sum only the int(n * (1 - R)) of its n scored tokens with the
smallest loss, and the sample size is that count, as in OFA's `adjust_label_smoothed_cross_entropy`
(accuracy still counts every token). Only in training; the task tells the criterion the update count
through `set_num_updates` (or `forward(..., update_num=)`, OFA's signature).
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from .layerwise_loss import drop_worst_keep, layerwise_label_smoothed_nll, mean_over_layers


@dataclass
class MueCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means none"})
    layer_weights: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated weights of decoder layers 1..L in the layer mean "
                          "(normalised to sum 1); default: plain mean"})
    last_layer_only: bool = field(
        default=False, metadata={"help": "train on the last decoder layer only (plain OFA loss)"})
    # a negative flag: fairseq turns a bool defaulting to True into a flag that sets it to False
    no_report_accuracy: bool = field(
        default=False, metadata={"help": "do not log per-layer token accuracy"})
    ignore_prefix_size: int = field(
        default=0, metadata={"help": "ignore the first N target tokens"})
    chunk_tokens: int = field(
        default=0, metadata={"help": "target tokens projected per chunk; 0 = from a 256 MB logits budget"})
    drop_worst_ratio: float = field(
        default=0.0, metadata={"help": "OFA's drop-worst: leave this fraction of the highest-loss target tokens "
                                       "out of each layer's loss (training only, after --drop-worst-after)"})
    drop_worst_after: int = field(
        default=0, metadata={"help": "apply --drop-worst-ratio once the update count exceeds this (OFA)"})


def parse_layer_weights(text: Optional[str]) -> Optional[List[float]]:
    """'1,1,2' -> [1.0, 1.0, 2.0]; None or '' -> None. Errors name the option and the bad item."""
    if text is None or str(text).strip() == "":
        return None
    weights = []
    for item in str(text).split(","):
        try:
            weights.append(float(item))
        except ValueError:
            raise ValueError(f"--layer-weights: '{item.strip()}' in '{text}' is not a number") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--layer-weights must be non-negative with a positive sum, got '{text}'")
    return weights


@register_criterion("mue", dataclass=MueCriterionConfig)
class MueCriterion(FairseqCriterion):
    """Mean over decoder layers of fairseq's label-smoothed cross-entropy."""

    def __init__(self, task, label_smoothing=0.0, layer_weights=None, last_layer_only=False,
                 no_report_accuracy=False, ignore_prefix_size=0, chunk_tokens=0, drop_worst_ratio=0.0,
                 drop_worst_after=0):
        super().__init__(task)
        if not 0.0 <= drop_worst_ratio < 1.0:
            raise ValueError(f"--drop-worst-ratio must lie in [0, 1), got {drop_worst_ratio}")
        if drop_worst_after < 0:
            raise ValueError(f"--drop-worst-after must be >= 0, got {drop_worst_after}")
        self.eps = label_smoothing
        self.layer_weights = parse_layer_weights(layer_weights)
        if last_layer_only and self.layer_weights is not None:
            raise ValueError("--last-layer-only and --layer-weights exclude each other")
        self.last_layer_only = last_layer_only
        self.report_accuracy = not no_report_accuracy
        self.ignore_prefix_size = ignore_prefix_size
        self.chunk_tokens = chunk_tokens
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.num_updates = None  # the trainer's update count, from set_num_updates

    def set_num_updates(self, num_updates: int) -> None:
        """The update count the next training batches belong to (drop-worst starts after a count)."""
        self.num_updates = int(num_updates)

    def drops_worst(self, model, update_num=None) -> bool:
        """Whether this batch drops the worst tokens: OFA's `update_num > drop_worst_after`, training only."""
        if self.drop_worst_ratio <= 0 or not model.training:
            return False
        update_num = self.num_updates if update_num is None else update_num
        if update_num is None:
            raise ValueError("criterion 'mue' with --drop-worst-ratio needs the update count: the task must call "
                             "criterion.set_num_updates(update_num) in train_step (or pass update_num=)")
        return update_num > self.drop_worst_after

    def forward(self, model, sample, reduce=True, update_num=None):
        """Returns (loss summed over tokens, sample_size = scored tokens (kept tokens under drop-worst),
        logging_output). `update_num` overrides the count from set_num_updates (OFA's signature)."""
        if not reduce:
            raise ValueError("criterion 'mue' only supports reduce=True")
        net_output = model(**sample["net_input"], return_all_hiddens=True)
        inner_states = net_output[1].get("inner_states") if len(net_output) > 1 else None
        if not inner_states or len(inner_states) < 2:
            raise ValueError("criterion 'mue' needs extra['inner_states'] (embedding + every decoder "
                             "layer) from model(..., return_all_hiddens=True)")
        num_layers = len(inner_states) - 1
        first = num_layers if self.last_layer_only else 1
        if self.layer_weights is not None and len(self.layer_weights) != num_layers:
            raise ValueError(f"--layer-weights has {len(self.layer_weights)} values but the decoder "
                             f"has {num_layers} layers")

        target = sample["target"]
        constraint_masks = sample.get("constraint_masks")
        states = torch.stack(inner_states[first:]).transpose(1, 2)  # [L, B, T, C]
        p = self.ignore_prefix_size
        if p > 0:
            states, target = states[:, :, p:], target[:, p:]
            if constraint_masks is not None:
                constraint_masks = constraint_masks[:, p:]
        if states.shape[1:3] != target.shape:
            raise ValueError(f"decoder states are B x T = {tuple(states.shape[1:3])} but the target "
                             f"is {tuple(target.shape)}")
        keep = target.ne(self.padding_idx)
        if constraint_masks is not None:
            constraint_masks = constraint_masks[keep]

        drop_ratio = self.drop_worst_ratio if self.drops_worst(model, update_num) else 0.0
        loss_l, nll_l, correct_l = layerwise_label_smoothed_nll(
            states[:, keep], model.decoder.project, target[keep], self.eps,
            ignore_index=self.padding_idx, constraint_mask=constraint_masks,
            chunk_tokens=self.chunk_tokens or None, drop_worst_ratio=drop_ratio,
            layer_weights=self.layer_weights)
        loss = mean_over_layers(loss_l, self.layer_weights)
        nll_loss = mean_over_layers(nll_l, self.layer_weights)

        ntokens = int(keep.sum())
        sample_size = drop_worst_keep(ntokens, drop_ratio)  # every layer keeps this many tokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        for k, layer in enumerate(range(first, num_layers + 1)):
            logging_output[f"loss_l{layer}"] = loss_l[k].data
            logging_output[f"nll_loss_l{layer}"] = nll_l[k].data
            if self.report_accuracy:
                logging_output[f"n_correct_l{layer}"] = utils.item(correct_l[k])
        if self.report_accuracy:
            logging_output["total"] = ntokens
            logging_output["n_correct"] = utils.item(correct_l[-1])  # the full model's accuracy
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs (base-2 losses and ppl as label_smoothed_cross_entropy). Losses and
        NLLs are per scored token: per sample_size, which is ntokens unless drop-worst left tokens out."""
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

        layers = sorted({int(key[len("loss_l"):]) for log in logging_outputs for key in log
                         if key.startswith("loss_l")})
        for layer in layers:
            metrics.log_scalar(f"loss_l{layer}", total(f"loss_l{layer}") / max(sample_size, 1) / math.log(2),
                               sample_size, round=3)
            metrics.log_scalar(f"nll_loss_l{layer}", total(f"nll_loss_l{layer}") / max(sample_size, 1) / math.log(2),
                               sample_size, round=3)

        n_total = total("total")
        if n_total > 0:
            metrics.log_scalar("total", n_total)
            metrics.log_scalar("n_correct", total("n_correct"))
            metrics.log_derived("accuracy", _accuracy("n_correct"))
            for layer in layers:
                metrics.log_scalar(f"n_correct_l{layer}", total(f"n_correct_l{layer}"))
                metrics.log_derived(f"accuracy_l{layer}", _accuracy(f"n_correct_l{layer}"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _accuracy(correct_key):
    """A derived-meter function: 100 * correct / total, rounded as fairseq does."""
    def compute(meters):
        n_total = meters["total"].sum
        return round(meters[correct_key].sum * 100.0 / n_total, 3) if n_total > 0 else float("nan")
    return compute
