"""fairseq criterion `mue_scst`: self-critical sequence training with a CIDEr-D reward (caption stage 2).

Per image, k captions are drawn with the model in eval mode and without gradients (fairseq's
SequenceGenerator: multinomial sampling at temperature 1 by default, `--scst-beam` for beam search's
k best as OFA's stage 2 does; no repeated 3-grams by default, `--scst-no-repeat-ngram-size`), starting from
bos as in training. Each caption's reward is its CIDEr-D against the image's
references, its baseline the mean reward of the image's other k-1 captions (leave-one-out), and the
loss is -sum_i (r_i - b_i) * log p(caption_i), the log-probability being teacher-forced through the
model in its own (training) mode, with gradients. sample_size is the number of sampled captions
(B * k), so the optimised quantity is the mean per caption.

References: the batch's `refs` (validation/test), else for training rows every reference of the row's
image in its split (`CaptionDataset.references_by_image`, which merges one-caption-per-row files, reading
every row at the first step). With `--scst-refs FILE` training rows' references are looked up per batch
in a reference store instead (mue.data.reference_store: SQLite, image id -> references), built from the
train split at the first step when FILE does not exist and rebuilt, with a warning, when the training file
changed since; `python -m mue.data.reference_store build-refs` builds one ahead.
Captions are decoded with the task's tokenizer and normalised as the references (`normalize_text`), with
symbols that are not text (<unk>, <mask>, image codes) and punctuation-only tokens read as word breaks
(`reward_text`), so that a sampled `a<mask>dog` is rewarded as "a dog", not "amaskdog".

CIDEr-D document frequencies come from the TRAINING references (one document per image). With
`--scst-cider-df FILE`: if FILE exists it is loaded (`CiderD.load_df`: mue's json, or OFA's
`coco-train-words.p` pickle); otherwise they are computed from the task's train split at the first
step (from the reference store with `--scst-refs`) and written to FILE for later runs. Without the
option they are computed at every start.

`--scst-ce-weight w > 0` adds w times MuE's layer-wise cross-entropy of the ground-truth caption
(mean per target token, `layerwise_loss`, with `--label-smoothing`, `--layer-weights`,
`--last-layer-only`), so all decoder layers stay usable for early exits. Sampled and ground-truth rows
go through ONE model call (one forward per backward, as DistributedDataParallel needs). The encoder runs
once per image and its output is shared by the image's k (+ 1) decoder rows (`encoder_rows`), where OFA's
SCST encodes every caption's copy of the image: the same loss and gradients when the encoder has no
dropout (both shipped stage-2 recipes), k times less encoder work; with encoder dropout the k captions of
an image share one dropout mask.

Logged: loss (per caption), scst_loss (per caption), reward (mean CIDEr-D of the samples), baseline
(mean leave-one-out baseline: equal to the mean reward by construction, a check), ce_loss (base 2,
per target token, only with a CE weight), sample_len (mean sampled tokens incl. eos).
"""
import logging
import math
import os
import pickle
import string
from argparse import Namespace
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from fairseq.sequence_generator import SequenceGenerator
from torch import Tensor

from mue.data.collater import pad_right
from mue.data.tokenizer import normalize_text
from mue.evaluation.cider_d import CiderD
from mue.generation.ngram_blocking import NGramBlocker

from .layerwise_loss import layerwise_label_smoothed_nll, mean_over_layers
from .mue import parse_layer_weights

logger = logging.getLogger(__name__)


@dataclass
class ScstConfig(FairseqDataclass):
    scst_samples: int = field(default=5, metadata={"help": "captions sampled per image (k >= 2)"})
    scst_beam: bool = field(
        default=False, metadata={"help": "use beam search's k best captions instead of sampling"})
    scst_max_len_b: int = field(default=16, metadata={"help": "max tokens of a sampled caption (OFA: 16)"})
    scst_no_repeat_ngram_size: int = field(
        default=3, metadata={"help": "captions never repeat an n-gram of this size (OFA's stage 2: 3; 0: off)"})
    scst_cider_df: Optional[str] = field(
        default=None,
        metadata={"help": "CIDEr-D document-frequency file: loaded if it exists, else computed from the "
                          "training references and written there"})
    scst_refs: Optional[str] = field(
        default=None,
        metadata={"help": "reference store of the training captions (SQLite, mue.data.reference_store): "
                          "references looked up per batch instead of reading every training row at the "
                          "first step; built there from the train split if missing, rebuilt if stale"})
    scst_ce_weight: float = field(
        default=0.0, metadata={"help": "weight of the layer-wise cross-entropy on the ground truth"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the CE term"})
    layer_weights: Optional[str] = field(
        default=None, metadata={"help": "comma-separated decoder layer weights of the CE term"})
    last_layer_only: bool = field(default=False, metadata={"help": "CE term on the last layer only"})


# ---- pure functions -------------------------------------------------------------------------------


def leave_one_out_baseline(rewards: Tensor) -> Tensor:
    """rewards [B, k] -> baselines [B, k]: for each sample, the mean reward of the other k-1 samples of
    its row."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"leave-one-out baseline needs rewards of shape [B, k>=2], got {tuple(rewards.shape)}")
    k = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def sequence_log_probs(logits: Tensor, target: Tensor, pad: int) -> Tensor:
    """Sum over non-pad positions of log p(target_t): logits [N, T, V], target [N, T] -> [N] (fp32)."""
    logits = logits.float()
    token_lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_lp.masked_fill(target.eq(pad), 0.0).sum(-1)


def scst_loss(seq_log_probs: Tensor, rewards: Tensor) -> Tuple[Tensor, Tensor]:
    """(-sum((r - b) * log p), b) for [B, k] log-probs and rewards; the advantage carries no gradient."""
    baseline = leave_one_out_baseline(rewards)
    advantage = (rewards - baseline).detach().to(seq_log_probs.dtype)
    return -(advantage * seq_log_probs).sum(), baseline


def reward_text(tokenizer, dictionary, tokens) -> str:
    """The words a sampled caption is rewarded for: ``tokens`` (dictionary indices) decoded and normalised
    as the references are (``normalize_text``), except that a symbol that is not text (<unk>, <mask>, an
    image code or location bin: no BPE id) or a BPE token of punctuation only separates the words around
    it instead of vanishing between them: ``a<mask>dog`` and ``red,a`` read "a dog" and "red a", where
    decoding then normalising would glue "amaskdog" and "reda". bos, eos and pad are dropped."""
    skip = {dictionary.bos(), dictionary.eos(), dictionary.pad()}
    pieces, run = [], []
    for index in torch.as_tensor(tokens).tolist():
        if index in skip:
            continue
        symbol = dictionary[index]
        if symbol.isdigit():
            text = tokenizer.bpe.bpe.decode([int(symbol)]).strip()
            if not text or any(c not in string.punctuation for c in text):
                run.append(index)  # a word, a word piece or whitespace: decoded with its neighbours
                continue
        if run:  # a special symbol or punctuation: the words before it end here
            pieces.append(tokenizer.decode(run, dictionary))
            run = []
    if run:
        pieces.append(tokenizer.decode(run, dictionary))
    return normalize_text(" ".join(pieces))


# ---- CIDEr-D with training document frequencies ---------------------------------------------------


def training_dataset(task):
    """The task's train split as a dataset with references; opened on the side if not loaded."""
    split = task.cfg.train_subset
    dataset = task.datasets.get(split)
    if dataset is None:
        dataset = task.build_dataset(split, task.open_reader(split), True)
    if not hasattr(dataset, "references_by_image"):
        raise TypeError(f"criterion mue_scst: split {split!r} ({type(dataset).__name__}) has no "
                        "references_by_image(); use it with --task mue_caption")
    return dataset


def training_references(task) -> List[List[str]]:
    """Every training image's normalised references (one list per image) from the task's train split."""
    return list(training_dataset(task).references_by_image().values())


def load_or_build_cider(task, path: Optional[str], store=None) -> CiderD:
    """CIDEr-D scorer with training-set document frequencies, read from / cached to `path` (see module);
    when computed, from the reference store `store` if given, else from the train split."""
    if path and os.path.exists(path):
        try:
            scorer = CiderD.load_df(path)
        except (ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"--scst-cider-df {path}: not a readable CIDEr-D document-frequency file "
                             f"({type(e).__name__}: {e}); delete it to recompute it from the training "
                             "references") from None
        logger.info("CIDEr-D document frequencies of %d images read from %s", scorer.num_docs, path)
        return scorer
    scorer = CiderD.from_corpus(store.iter_all() if store is not None else training_references(task))
    logger.info("CIDEr-D document frequencies computed from %d training images", scorer.num_docs)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        scorer.save_df(tmp)
        os.replace(tmp, path)  # atomic: parallel workers never read a half-written file
        logger.info("CIDEr-D document frequencies written to %s", path)
    return scorer


# ---- the criterion --------------------------------------------------------------------------------


@register_criterion("mue_scst", dataclass=ScstConfig)
class ScstCriterion(FairseqCriterion):
    """Self-critical sequence training with a CIDEr-D reward (see the module docstring)."""

    def __init__(self, task, scst_samples=5, scst_beam=False, scst_max_len_b=16, scst_no_repeat_ngram_size=3,
                 scst_cider_df=None, scst_refs=None, scst_ce_weight=0.0, label_smoothing=0.0, layer_weights=None,
                 last_layer_only=False):
        super().__init__(task)
        if scst_samples < 2:
            raise ValueError(f"--scst-samples must be >= 2 (leave-one-out baseline), got {scst_samples}")
        if scst_max_len_b < 1:
            raise ValueError(f"--scst-max-len-b must be >= 1, got {scst_max_len_b}")
        if scst_no_repeat_ngram_size < 0:
            raise ValueError(f"--scst-no-repeat-ngram-size must be >= 0, got {scst_no_repeat_ngram_size}")
        self.no_repeat_ngram_size = scst_no_repeat_ngram_size
        if not scst_ce_weight >= 0 or math.isinf(scst_ce_weight):
            raise ValueError(f"--scst-ce-weight must be a finite number >= 0, got {scst_ce_weight}")
        self.k = scst_samples
        self.beam = scst_beam
        self.max_len_b = scst_max_len_b
        self.cider_df = scst_cider_df
        self.refs_path = scst_refs
        self._store = None
        self.ce_weight = scst_ce_weight
        self.eps = label_smoothing
        self.layer_weights = parse_layer_weights(layer_weights)
        if last_layer_only and self.layer_weights is not None:
            raise ValueError("--last-layer-only and --layer-weights exclude each other")
        self.last_layer_only = last_layer_only
        self._scorer = None
        self._generators = {}  # a plain dict: the generator holds the model and must not be a submodule

    # ---- pieces --------------------------------------------------------------------------------
    @property
    def scorer(self) -> CiderD:
        if self._scorer is None:
            store = self.reference_store if self.refs_path else None
            self._scorer = load_or_build_cider(self.task, self.cider_df, store)
        return self._scorer

    @property
    def reference_store(self):
        """The training references' store at --scst-refs (opened, built or rebuilt at first use)."""
        if self._store is None:
            from mue.data.reference_store import open_reference_store  # not at import: `python -m` runs it

            self._store = open_reference_store(self.refs_path, training_dataset(self.task))
        return self._store

    def generator(self, model) -> SequenceGenerator:
        """fairseq's generator for `model` (full model, no exits): sampling or beam, k results per row."""
        key = id(model)
        if key not in self._generators:
            args = Namespace(beam=self.k, sampling=not self.beam, max_len_a=0, max_len_b=self.max_len_b,
                             min_len=1, temperature=1.0, no_repeat_ngram_size=self.no_repeat_ngram_size)
            training = model.training
            generator = self.task.build_generator([model], args, seq_gen_cls=SequenceGenerator)
            if generator.repeat_ngram_blocker is not None:  # fairseq's CPU fallback blocks nothing
                generator.repeat_ngram_blocker = NGramBlocker(self.no_repeat_ngram_size)
            self._generators[key] = generator
            model.train(training)  # SequenceGenerator.__init__ switches the model to eval mode
        return self._generators[key]

    def sample_captions(self, model, sample) -> List[List[Tensor]]:
        """k caption token tensors (ending with eos) per row, drawn in eval mode without gradients."""
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hypos = self.generator(model).generate([model], sample, bos_token=self.task.target_dictionary.bos())
        finally:
            model.train(training)
        for row, hyps in enumerate(hypos):
            if len(hyps) != self.k:
                raise RuntimeError(f"row {row} (id {int(sample['id'][row])}): the generator returned {len(hyps)} "
                                   f"captions, expected --scst-samples {self.k}")
        return [[h["tokens"] for h in hyps] for hyps in hypos]

    def references(self, sample) -> List[List[str]]:
        """Normalised references per row: the batch's `refs`, else the row's image's training references
        (from the --scst-refs store when given, one lookup per batch)."""
        if sample.get("refs") is not None:
            return sample["refs"]
        split, image_ids = sample.get("split"), sample.get("image_ids")
        if split is None or image_ids is None:
            raise ValueError("criterion mue_scst: the batch has neither 'refs' nor 'split' + 'image_ids' to "
                             "find the references (use --task mue_caption)")
        if self.refs_path and split == self.task.cfg.train_subset:
            return self.reference_store.refs(image_ids)
        by_image = self.task.dataset(split).references_by_image()
        missing = [i for i in image_ids if i not in by_image]
        if missing:
            raise KeyError(f"split {split!r}: no references for image ids {missing[:5]}")
        return [by_image[i] for i in image_ids]

    def rewards(self, captions: Sequence[Sequence[Tensor]], refs: Sequence[Sequence[str]]) -> Tensor:
        """CIDEr-D [B, k] of each row's caption tokens against that row's references."""
        texts = [reward_text(self.task.tokenizer, self.task.target_dictionary, c) for row in captions for c in row]
        refs_list = [r for r, row in zip(refs, captions) for _ in row]
        scores = self.scorer.batch_scores(texts, refs_list)
        return torch.from_numpy(np.asarray(scores, dtype=np.float32)).view(len(captions), -1)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, model, sample, reduce=True):
        """Returns (loss summed over sampled captions, sample_size = B * k, logging_output)."""
        if not reduce:
            raise ValueError("criterion 'mue_scst' only supports reduce=True")
        if sample.get("constraint_masks") is not None:
            raise ValueError("criterion 'mue_scst' does not take constraint masks (it is for captioning)")
        refs = self.references(sample)
        captions = self.sample_captions(model, sample)
        bsz, k = len(captions), self.k
        d = self.task.target_dictionary
        pad = self.padding_idx

        flat = [c for row in captions for c in row]
        sampled_target = pad_right(flat, pad)
        sampled_prev = pad_right([torch.cat([c.new_tensor([d.bos()]), c[:-1]]) for c in flat], pad)
        net_input = sample["net_input"]
        order = torch.arange(bsz, device=sampled_target.device).repeat_interleave(k)
        with_ce = self.ce_weight > 0
        if with_ce:  # ground-truth rows after the sampled ones, in the same model call
            order = torch.cat([order, torch.arange(bsz, device=order.device)])
            prev = pad_right(list(sampled_prev) + list(net_input["prev_output_tokens"]), pad)
        else:
            prev = sampled_prev
        inputs = {key: net_input[key] for key in ("src_tokens", "src_lengths", "patch_images", "patch_masks")}
        logits, extra = model(**inputs, prev_output_tokens=prev, encoder_rows=order, return_all_hiddens=with_ce)

        n_seq = bsz * k
        seq_lp = sequence_log_probs(logits[:n_seq, : sampled_target.size(1)], sampled_target, pad)
        reward = self.rewards(captions, refs).to(seq_lp.device)
        rl_loss, baseline = scst_loss(seq_lp.view(bsz, k), reward)
        loss = rl_loss
        logging_output = {
            "scst_loss": rl_loss.data, "reward": reward.sum().item(), "baseline": baseline.sum().item(),
            "nsamples": n_seq, "ntokens": int(sampled_target.ne(pad).sum()), "nsentences": bsz,
            "sample_size": n_seq,
        }
        if with_ce:
            ce_sum, ce_tokens = self.ce_term(model, extra, sample["target"], n_seq)
            loss = loss + self.ce_weight * ce_sum * (n_seq / max(ce_tokens, 1))
            logging_output.update(ce_loss=ce_sum.data, ce_ntokens=ce_tokens)
        logging_output["loss"] = loss.data
        return loss, n_seq, logging_output

    def ce_term(self, model, extra, target, first_row: int) -> Tuple[Tensor, int]:
        """Layer-wise label-smoothed CE (sum over target tokens, mean over layers) of the ground-truth
        rows `first_row:` of the shared model call; returns (loss sum, scored tokens)."""
        inner_states = extra.get("inner_states") if isinstance(extra, dict) else None
        if not inner_states or len(inner_states) < 2:
            raise ValueError("criterion 'mue_scst' with --scst-ce-weight needs extra['inner_states'] from "
                             "model(..., return_all_hiddens=True)")
        num_layers = len(inner_states) - 1
        if self.layer_weights is not None and len(self.layer_weights) != num_layers:
            raise ValueError(f"--layer-weights has {len(self.layer_weights)} values but the decoder has "
                             f"{num_layers} layers")
        first = num_layers if self.last_layer_only else 1
        states = torch.stack(inner_states[first:]).transpose(1, 2)  # [L, rows, T, C]
        states = states[:, first_row:, : target.size(1)]
        keep = target.ne(self.padding_idx)
        loss_l, _, _ = layerwise_label_smoothed_nll(states[:, keep], model.decoder.project, target[keep],
                                                    self.eps, ignore_index=self.padding_idx,
                                                    layer_weights=self.layer_weights)
        return mean_over_layers(loss_l, self.layer_weights), int(keep.sum())

    # ---- metrics -------------------------------------------------------------------------------
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        n = max(total("nsamples"), 1)
        metrics.log_scalar("loss", total("loss") / max(total("sample_size"), 1), n, round=4)
        metrics.log_scalar("scst_loss", total("scst_loss") / n, n, round=4)
        metrics.log_scalar("reward", total("reward") / n, n, round=4)
        metrics.log_scalar("baseline", total("baseline") / n, n, round=4)
        metrics.log_scalar("sample_len", total("ntokens") / n, n, round=2)
        ce_tokens = total("ce_ntokens")
        if ce_tokens > 0:
            metrics.log_scalar("ce_loss", total("ce_loss") / ce_tokens / math.log(2), ce_tokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
