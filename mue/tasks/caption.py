"""Task ``mue_caption``: image captioning as OFA poses it (COCO, Karpathy split, or OFA's caption TSV).

Source ``' what does the image describe?'``; target the normalised caption (lower case, no punctuation,
at most ``--max-tgt-length`` words). Evaluation examples keep every normalised reference.

Validation with ``--eval-cider``: captions are generated with the task's exit knobs (``--eval-args``, a
json of generation options) by a generator built for the model fairseq validates; the exit summary
(``mue_time_reduction`` ...) is logged beside two corpus metrics, built from per-batch sums so fairseq
adds them up over batches and workers: ``cider`` (x100; per-image CIDEr-D with document frequencies fixed once from the whole
validation split's references, so its mean is pycocoevalcap's corpus CIDEr on whitespace tokens) and
``bleu4`` (x100; pycocoevalcap's closest-reference corpus BLEU from summed n-gram counts).

fairseq-generate: captions are printed as usual (H-/D- lines) and collected by the task; when every
example of the split has a caption, the full COCO metric set (``compute_caption_metrics``: PTB tokenizer,
BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE if installed) is logged, and with ``--eval-results FILE`` the
captions, references and scores are written there (``python -m mue.evaluation.caption_metrics --results
FILE`` rescores it), and with ``--coco-results FILE`` the captions as the COCO results list that
pycocotools / OFA's evaluation read (mue.evaluation.result_files). fairseq's own end-of-run BLEU line
compares against the first reference only: ignore it.
"""
import json
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task

from mue.data.datasets import CaptionDataset
from mue.data.readers import DataError, OfaCaptionTsv
from mue.data.tokenizer import CAPTION_PROMPT, normalize_text
from mue.errors import OptionError
from mue.evaluation.caption_metrics import BLEU_ORDER, CaptionResults, bleu_stats, corpus_bleu
from mue.exiting.session import unwrap

from .vl_task import EXIT_PREFIX, VisionLanguageConfig, VisionLanguageTask

logger = logging.getLogger(__name__)


@dataclass
class CaptionConfig(VisionLanguageConfig):
    eval_cider: bool = field(default=False, metadata={"help": "generate captions in validation; log cider and bleu4"})
    eval_args: str = field(
        default='{"beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}',
        metadata={"help": "generation options for validation, as json (fairseq GenerationConfig fields)"})
    eval_metrics: str = field(
        default="bleu,meteor,rouge,cider,spice",
        metadata={"help": "pycocoevalcap metrics computed by fairseq-generate (comma-separated subset of "
                          "bleu,meteor,rouge,cider,spice); METEOR starts a JVM (~9 s), so threshold sweeps "
                          "may leave it out"})
    coco_results: Optional[str] = field(
        default=None, metadata={"help": "fairseq-generate: also write the captions as a COCO results list "
                                        "[{image_id, caption}] to this json file, the file pycocotools' loadRes "
                                        "and OFA's evaluation read (numeric image ids as integers)"})


@register_task("mue_caption", dataclass=CaptionConfig)
class CaptionTask(VisionLanguageTask):
    RECORD_TASK = "caption"
    TSV_READER = OfaCaptionTsv

    def __init__(self, cfg, dictionary, tokenizer):
        super().__init__(cfg, dictionary, tokenizer)
        self._validation_generator = None  # (model, generator): rebuilt when validation gets another model
        self._results = {}

    @property
    def eval_metric_names(self):
        from mue.evaluation.caption_metrics import ALL_METRICS

        names = [m.strip() for m in self.cfg.eval_metrics.split(",") if m.strip()]
        unknown = sorted(set(names) - set(ALL_METRICS))
        if unknown or not names:
            raise ValueError(f"--eval-metrics: unknown {unknown or 'empty list'}; choose from {','.join(ALL_METRICS)}")
        return names

    def check_dictionary(self, path):
        if self.tokenizer.encode(CAPTION_PROMPT, self.dict).eq(self.dict.unk()).any():
            raise DataError(f"{path}: the dictionary lacks BPE ids of the prompt {CAPTION_PROMPT!r} (wrong dict.txt?)")

    def build_dataset(self, split, reader, is_train):
        return CaptionDataset(split, reader, self.dict, self.tokenizer, **self.dataset_kwargs(is_train))

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_cider:
            self.validation_generator(model)  # a bad --eval-args fails now, not at the first validation
        return model

    def validation_generator(self, model):
        """The generator of --eval-cider (--eval-args, the task's exit knobs) for the model being validated:
        built for that very model, so validation scores the weights fairseq hands it (a wrapped or EMA
        model included), not the model that existed when the task was set up."""
        inner = unwrap(model)
        if self._validation_generator is None or self._validation_generator[0] is not inner:
            try:
                gen_args = json.loads(self.cfg.eval_args)
            except json.JSONDecodeError as e:
                raise OptionError(f"--eval-args is not valid json: {e}") from None
            self._validation_generator = (inner, self.build_generator([inner], Namespace(**gen_args)))
        return self._validation_generator[1]

    def generate_captions(self, generator, models, sample):
        """(hypotheses, normalised caption per row) with the given generator, without collecting."""
        hypos = FairseqTask.inference_step(self, generator, models, sample)
        return hypos, [normalize_text(self.decode(h[0]["tokens"])) for h in hypos]

    # ---- validation ------------------------------------------------------------------------
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if not self.cfg.eval_cider:
            return loss, sample_size, logging_output
        if "refs" not in sample:
            raise DataError(f"--eval-cider: split {sample.get('split')!r} has no references (is it the training split?)")
        generator = self.validation_generator(model)
        if hasattr(generator, "reset_stats"):
            generator.reset_stats()
        _, hyps = self.generate_captions(generator, [unwrap(model)], sample)
        if hasattr(generator, "stats"):  # the exit summary beside the score
            logging_output.update({EXIT_PREFIX + k: v for k, v in generator.stats.sums().items()})
        cider = self.datasets[sample["split"]].corpus_cider()
        logging_output["_cider_sum"] = float(sum(cider.score(h, r) for h, r in zip(hyps, sample["refs"])))
        logging_output["_cider_cnt"] = len(hyps)
        totals = {"testlen": 0, "reflen": 0, "correct": [0] * BLEU_ORDER, "guess": [0] * BLEU_ORDER}
        for h, r in zip(hyps, sample["refs"]):
            st = bleu_stats(h, r)
            totals["testlen"] += st["testlen"]
            totals["reflen"] += st["reflen"]
            for k in range(BLEU_ORDER):
                totals["correct"][k] += st["correct"][k]
                totals["guess"][k] += st["guess"][k]
        logging_output["_bleu_testlen"] = totals["testlen"]
        logging_output["_bleu_reflen"] = totals["reflen"]
        for k in range(BLEU_ORDER):
            logging_output[f"_bleu_correct_{k}"] = totals["correct"][k]
            logging_output[f"_bleu_guess_{k}"] = totals["guess"][k]
        if self.cfg.eval_print_samples:
            logger.info("example hypothesis: %s", hyps[0])
            logger.info("example references: %s", " | ".join(sample["refs"][0]))
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum(log.get("_cider_cnt", 0) for log in logging_outputs)
        if count == 0:
            return
        keys = ["_cider_sum", "_cider_cnt", "_bleu_testlen", "_bleu_reflen"] + [
            f"_bleu_{kind}_{k}" for kind in ("correct", "guess") for k in range(BLEU_ORDER)]
        for key in keys:
            metrics.log_scalar_sum(key, sum(log.get(key, 0) for log in logging_outputs))

        def cider(m):
            return round(100.0 * float(m["_cider_sum"].sum) / max(1.0, float(m["_cider_cnt"].sum)), 2)

        def bleu4(m):
            b = corpus_bleu([float(m[f"_bleu_correct_{k}"].sum) for k in range(BLEU_ORDER)],
                            [float(m[f"_bleu_guess_{k}"].sum) for k in range(BLEU_ORDER)],
                            float(m["_bleu_testlen"].sum), float(m["_bleu_reflen"].sum))
            return round(100.0 * b[-1], 2)

        metrics.log_derived("cider", cider)
        metrics.log_derived("bleu4", bleu4)

    # ---- fairseq-generate ------------------------------------------------------------------
    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        with torch.no_grad():
            hypos = generator.generate(models, sample, prefix_tokens=prefix_tokens, constraints=constraints)
        if "refs" in sample and self.split_size(sample) is not None:
            self._collect(sample, hypos, generator)
        return hypos

    def _collect(self, sample, hypos, generator=None):
        """Keep the captions; at the split's last batch score them all (and write --eval-results)."""
        split = sample["split"]
        results = self._results.setdefault(split, CaptionResults(split, self.split_size(sample)))
        for i, h in enumerate(hypos):
            uid = sample["uniq_ids"][i] if "uniq_ids" in sample else str(int(sample["id"][i]))
            results.add(uid, normalize_text(self.decode(h[0]["tokens"])), sample["refs"][i],
                        image_id=sample["image_ids"][i] if "image_ids" in sample else None)
        complete = self.count_evaluated(sample)
        if complete is None:
            return
        self._results.pop(split)
        if not complete:
            return  # count_evaluated logged the error: no scores over a partial split
        scores = results.compute(metrics=self.eval_metric_names)
        logger.info("caption metrics on %s (%d images): %s", split, len(results),
                    ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
        self.finish_evaluation(split, scores, len(results), results.predictions(), generator)
        if self.cfg.coco_results:
            from mue.evaluation.result_files import write_coco_results

            write_coco_results(self.cfg.coco_results, results.predictions())
            logger.info("COCO results of %s (%d captions) written to %s", split, len(results), self.cfg.coco_results)
