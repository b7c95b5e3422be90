"""Task ``mue_snli_ve``: visual entailment as OFA poses it, answered by scoring the three answers.

Source ``' does the image describe " HYP "?'`` (``--add-premise``: OFA's premise prompt), target the answer
(" yes" entailment, " no" contradiction, " maybe" neutral) + eos, with constraint masks restricting the
output to the answers' tokens; ``--decoder-prompt`` (OFA's SNLI-VE recipe, its prompt type prev_output)
has the decoder read the question before the answer, with the loss on the answer only. Prediction
(validation and fairseq-generate): each answer is scored with teacher forcing -- the sum of its tokens'
log-probabilities, eos included -- and the best one wins (``score_candidates``). Validation scores the answers with the configured exits and logs ``snli_score``
(accuracy, %) beside the exit summary (``mue_time_reduction`` ...). fairseq-generate prints the chosen
answer per example (H-/D- lines) and, once the whole split is scored, logs the accuracy and writes
``--eval-results`` if given (``--snli-results``: OFA-style predictions, mue.evaluation.result_files).
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from fairseq.logging import metrics
from fairseq.tasks import register_task

from mue.data.collater import pad_right
from mue.data.datasets import SnliVeDataset, encode_answer_candidates
from mue.data.readers import DataError, OfaSnliVeTsv
from mue.data.tokenizer import SNLI_VE_ANSWERS, SNLI_VE_PREMISE_PROMPT, SNLI_VE_PROMPT
from mue.exiting.session import exit_session

from .vl_task import VisionLanguageConfig, VisionLanguageTask

logger = logging.getLogger(__name__)


def score_candidates(model, sample, candidates: Sequence[torch.Tensor], pad: int = None, bos: int = None,
                     return_token_scores: bool = False, decoder_prompt: bool = False):
    """Teacher-forced score of every candidate answer for every row: FloatTensor[B, K].

    ``candidates``: K target token sequences (answer tokens + eos), shared by all rows. The encoder runs
    once; its output is repeated K times and the decoder scores the B*K (row, candidate) pairs in one
    call. A score is the sum of the candidate tokens' log-probabilities (eos included) under the full
    softmax -- OFA's constrained scoring, since masking other tokens does not change these values.
    ``decoder_prompt`` (OFA's prompt type ``prev_output``): the decoder reads each row's source text
    (bos + tokens, without eos) before the answer; else it starts from bos alone.
    Exits: those of the exit session the call runs in, if any (mue.exiting.session.exit_session).
    ``return_token_scores``: also return the answer tokens' log-probs [B, K, L] (0 at padding).
    """
    pad = model.decoder.dictionary.pad() if pad is None else pad
    bos = model.decoder.dictionary.bos() if bos is None else bos
    net_input = sample["net_input"]
    src = net_input["src_tokens"]
    bsz, k = src.size(0), len(candidates)
    candidates = [c.to(src.device) for c in candidates]
    prompts = [row[row.ne(pad)][:-1] for row in src] if decoder_prompt else [src.new_tensor([bos])] * bsz
    # row b, candidate j at b*K + j: the prompt, then the answer; the answer's scores start where the prompt ends
    prev = pad_right([torch.cat([p, c[:-1]]) for p in prompts for c in candidates], pad)
    starts = torch.tensor([p.numel() - 1 for p in prompts for _ in candidates], device=src.device)
    cands = pad_right(candidates, pad).repeat(bsz, 1)  # (B*K) x L
    encoder_input = {key: v for key, v in net_input.items() if key != "prev_output_tokens"}
    encoder_out = model.encoder(**encoder_input)
    order = torch.arange(bsz, device=src.device).repeat_interleave(k)
    encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
    logits = model.decoder(prev, encoder_out=encoder_out)[0]
    positions = (starts.unsqueeze(1) + torch.arange(cands.size(1), device=src.device)).clamp(max=logits.size(1) - 1)
    logits = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    token_scores = lprobs.gather(-1, cands.unsqueeze(-1)).squeeze(-1).masked_fill(cands.eq(pad), 0.0)
    token_scores = token_scores.view(bsz, k, -1)
    scores = token_scores.sum(-1)
    return (scores, token_scores) if return_token_scores else scores


def attached_exits(generator):
    """The exit-aware generator's exits, switched on (and timed, and accounted) while scoring; with
    another generator, none."""
    if hasattr(generator, "exits_attached"):
        return generator.exits_attached()
    return contextlib.nullcontext()


@dataclass
class SnliVeConfig(VisionLanguageConfig):
    decoder_prompt: bool = field(
        default=False, metadata={"help": "the decoder reads the source text (bos + question, without eos) and "
                                         "answers after it, as OFA's SNLI-VE recipe does (its --prompt-type "
                                         "prev_output); without it the decoder starts from bos alone"})
    add_premise: bool = field(
        default=False, metadata={"help": "use OFA's premise prompt: can image and text1 \" P \" imply text2 \" H \"?"})
    # a negative flag: fairseq turns a bool field that defaults to True into a flag that sets it False
    no_group_by_image: bool = field(
        default=False, metadata={"help": "evaluate the pairs in file order; by default evaluation (validation, "
                                         "fairseq-generate) takes the pairs of one image in a row, so batches "
                                         "share images and each image is encoded once (every example is still "
                                         "scored once either way)"})
    snli_results: Optional[str] = field(
        default=None, metadata={"help": "fairseq-generate: also write OFA-style predictions to this json file: "
                                        "{split, accuracy, n_examples, predictions: [{uniq_id, answer}]} "
                                        "(answer: the predicted one)"})


@register_task("mue_snli_ve", dataclass=SnliVeConfig)
class SnliVeTask(VisionLanguageTask):
    RECORD_TASK = "snli_ve"
    TSV_READER = OfaSnliVeTsv
    JSONL_NAMES = ("snli_ve_{split}.jsonl", "{split}.jsonl")

    def __init__(self, cfg, dictionary, tokenizer):
        super().__init__(cfg, dictionary, tokenizer)
        self.candidates: List[torch.Tensor] = []
        self._gen = {}

    def check_dictionary(self, path):
        try:
            self.candidates = encode_answer_candidates(self.tokenizer, self.dict)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        # the prompt around a stand-in word "x", whose own BPE id is not required
        prompt = SNLI_VE_PREMISE_PROMPT.format(premise="x", hypothesis="x") if self.cfg.add_premise \
            else SNLI_VE_PROMPT.format(hypothesis="x")
        stand_in = set(self.tokenizer.bpe_ids(" x").split())
        missing = [t for t in self.tokenizer.bpe_ids(prompt).split()
                   if t not in stand_in and self.dict.index(t) == self.dict.unk()]
        if missing:
            raise DataError(f"{path}: the dictionary lacks the BPE ids {missing} of the prompt {prompt!r} "
                            "(wrong dict.txt?)")

    def build_dataset(self, split, reader, is_train):
        return SnliVeDataset(split, reader, self.dict, self.tokenizer, add_premise=self.cfg.add_premise,
                             decoder_prompt=self.cfg.decoder_prompt,
                             group_by_image=not self.cfg.no_group_by_image, **self.dataset_kwargs(is_train))

    # ---- validation ------------------------------------------------------------------------
    def valid_step(self, sample, model, criterion):
        """fairseq's loss, plus the answers scored with the configured exits (accuracy ``snli_score``
        and the exit summary, ``mue_*``)."""
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        with torch.no_grad(), exit_session(model, self.cfg) as settings:
            pred = score_candidates(model, sample, self.candidates,
                                    decoder_prompt=self.cfg.decoder_prompt).argmax(-1)
        logging_output.update(self.exit_logging_output(model, settings.trace))
        logging_output["_snli_score_sum"] = int(pred.eq(sample["labels"]).sum().item())
        logging_output["_snli_cnt"] = int(pred.numel())
        if self.cfg.eval_print_samples:
            logger.info("example: %s -> %s (gold %s)", sample.get("uniq_ids", ["?"])[0],
                        SNLI_VE_ANSWERS[pred[0]].strip(), sample["answers"][0])
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum(log.get("_snli_cnt", 0) for log in logging_outputs)
        if count == 0:
            return
        metrics.log_scalar_sum("_snli_score_sum", sum(log.get("_snli_score_sum", 0) for log in logging_outputs))
        metrics.log_scalar_sum("_snli_cnt", count)
        metrics.log_derived(
            "snli_score",
            lambda m: round(100.0 * float(m["_snli_score_sum"].sum) / max(1.0, float(m["_snli_cnt"].sum)), 2))

    # ---- fairseq-generate ------------------------------------------------------------------
    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Answer by candidate scoring; returns fairseq hypotheses (the best answer per row)."""
        if len(models) != 1:
            raise NotImplementedError("mue_snli_ve scores answers with one model; ensembles are not supported")
        model = models[0]
        with torch.no_grad(), attached_exits(generator):
            scores, token_scores = score_candidates(model, sample, self.candidates, return_token_scores=True,
                                                           decoder_prompt=self.cfg.decoder_prompt)
        best = scores.argmax(-1)
        hypos = []
        for i, j in enumerate(best.tolist()):
            cand = self.candidates[j].to(scores.device)
            hypos.append([{"tokens": cand, "score": scores[i, j], "alignment": None,
                           "positional_scores": token_scores[i, j, : cand.numel()].clone()}])
        if "labels" in sample:
            self._collect(sample, best, generator)
        return hypos

    def _collect(self, sample, best, generator=None):
        """Keep the predictions; at the split's last batch log the accuracy (and write --eval-results)."""
        split = sample.get("split")
        acc = self._gen.setdefault(split, {"correct": 0, "rows": []})
        for i, (p, g) in enumerate(zip(best.tolist(), sample["labels"].tolist())):
            acc["correct"] += int(p == g)
            acc["rows"].append({"uniq_id": sample["uniq_ids"][i] if "uniq_ids" in sample else int(sample["id"][i]),
                                "prediction": SNLI_VE_ANSWERS[p].strip(), "answer": SNLI_VE_ANSWERS[g].strip()})
        complete = self.count_evaluated(sample)
        if complete is None:
            return
        self._gen.pop(split)
        if not complete:
            return  # count_evaluated logged the error: no accuracy over a partial split
        n = len(acc["rows"])
        accuracy = 100.0 * acc["correct"] / n
        logger.info("SNLI-VE %s: accuracy %.2f (%d/%d examples)", split, accuracy, acc["correct"], n)
        self.finish_evaluation(split, {"accuracy": accuracy / 100.0}, n, acc["rows"], generator)
        if self.cfg.snli_results:
            from mue.evaluation.result_files import write_snli_ve_predictions

            write_snli_ve_predictions(self.cfg.snli_results, acc["rows"], accuracy / 100.0, split)
            logger.info("SNLI-VE predictions of %s (%d examples) written to %s", split, n, self.cfg.snli_results)
