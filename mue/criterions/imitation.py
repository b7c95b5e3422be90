"""fairseq criterion `mue_imitation`: trains the DeeCap-style imitation heads with the backbone frozen.

The backbone (everything but ``decoder.exit_heads``) runs in eval mode without gradients, so its
parameters get no gradient and no optimizer changes them; dropout is off, as at inference. For each
decoder layer i in 1..L-1 the head ``g_i`` predicts the last layer's state from layer i's, and the loss
compares ``LN(g_i(h_i))`` with ``LN(h_L)`` (LN: the decoder's shared final LayerNorm, i.e. the states
the output projection reads) at every scored target position: squared error summed over features
(``mse``) or ``1 - cosine`` (``cosine``), summed over tokens, averaged over layers. Logged per layer
as ``imit_l{i}`` with the mean cosine ``imit_cos_l{i}``. Train with ``--task ... --exit-policy imitation``
(which creates the heads) from a trained backbone: ``--restore-file backbone.pt --reset-optimizer
--reset-dataloader --reset-meters --reset-lr-scheduler``.
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

IMITATION_LOSSES = ("mse", "cosine")


@dataclass
class ImitationCriterionConfig(FairseqDataclass):
    imitation_loss: ChoiceEnum(IMITATION_LOSSES) = field(
        default="mse", metadata={"help": "distance between imitated and real last-layer states (after the "
                                         "final LayerNorm): mse (summed over features) or cosine (1 - cos)"})


@contextlib.contextmanager
def frozen_backbone(model):
    """Eval mode and no gradients for the block; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@register_criterion("mue_imitation", dataclass=ImitationCriterionConfig)
class ImitationCriterion(FairseqCriterion):
    def __init__(self, task, imitation_loss="mse"):
        super().__init__(task)
        self.loss_kind = imitation_loss

    def forward(self, model, sample, reduce=True):
        """Returns (loss summed over scored tokens, averaged over layers; sample_size = tokens; logging)."""
        if not reduce:
            raise ValueError("criterion 'mue_imitation' only supports reduce=True")
        heads = getattr(model.decoder, "exit_heads", None)
        if heads is None:
            raise ValueError("criterion 'mue_imitation' trains the imitation heads: run the task with "
                             "--exit-policy imitation, which adds them to the model")
        with frozen_backbone(model):
            _, extra = model(**sample["net_input"], return_all_hiddens=True)
        states = extra["inner_states"]  # embedding + L layers, each T x B x C
        if len(states) - 1 != len(heads) + 1:
            raise ValueError(f"criterion 'mue_imitation': {len(states) - 1} decoder layers but {len(heads)} heads")
        keep = sample["target"].ne(self.padding_idx).transpose(0, 1)  # T x B
        ln = model.decoder.layer_norm  # the backbone's: applied with its parameters detached (frozen)

        def norm(x):
            return F.layer_norm(x, ln.normalized_shape, ln.weight.detach(), ln.bias.detach(), ln.eps)

        deep = norm(states[-1][keep])
        losses, cosines = [], []
        for idx in range(len(heads)):
            pred = norm(heads(idx, states[idx + 1][keep]))
            cos = F.cosine_similarity(pred, deep, dim=-1)
            per_token = (pred - deep).pow(2).sum(-1) if self.loss_kind == "mse" else 1.0 - cos
            losses.append(per_token.sum())
            cosines.append(cos.detach().sum())
        loss = torch.stack(losses).mean()
        ntokens = int(keep.sum())
        logging_output = {"loss": loss.data, "ntokens": ntokens, "nsentences": sample["target"].size(0),
                          "sample_size": ntokens}
        for idx, (layer_loss, cos) in enumerate(zip(losses, cosines)):
            logging_output[f"imit_l{idx + 1}"] = layer_loss.data
            logging_output[f"imit_cos_l{idx + 1}"] = cos
        return loss, ntokens, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = max(total("sample_size"), 1)
        metrics.log_scalar("loss", total("loss") / sample_size, sample_size, round=4)
        layers = sorted({int(k[len("imit_l"):]) for log in logging_outputs for k in log if k.startswith("imit_l")})
        for layer in layers:
            metrics.log_scalar(f"imit_l{layer}", total(f"imit_l{layer}") / sample_size, sample_size, round=4)
            metrics.log_scalar(f"imit_cos_l{layer}", total(f"imit_cos_l{layer}") / sample_size, sample_size, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
