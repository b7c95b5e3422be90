"""``MueModel``: caption images and answer entailment questions with a loaded checkpoint.

Inputs go the way fairseq-generate's go: records like the data readers' are turned into examples by
the task's own dataset class (OFA's resize and normalisation, prompts, text normalisation, dictionary
checks) and batched by its collater; the task answers with ``inference_step`` and the generator its
``build_generator`` makes (mue.generation.MueSequenceGenerator, with the exit knobs on the task's
config). So for the same images, options and batches the answers are fairseq-generate's, and
mue.api.tracking reads each example's exit figures out of the same run.
"""
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from fairseq import utils as fairseq_utils
from fairseq.dataclass.configs import GenerationConfig

from mue.data.datasets import SNLI_VE_LABEL_TO_CLASS
from mue.data.tokenizer import CAPTION_PROMPT, SNLI_VE_ANSWERS, normalize_text
from mue.errors import OptionError
from mue.exiting.config import EXIT_KNOBS, ExitConfig, exit_config
from mue.models.image_reuse import ImageStreamCache
from mue.models.state_dict import CheckpointMismatchError

from .checkpoint import OpenedCheckpoint
from .inputs import ImageInput, image_inputs
from .results import Caption, Entailment
from .tracking import BatchObserver

SPLIT = "api"  # the split name the API's examples carry (no evaluation collects it)
#: the caption dataset builds a training target for every record; generation never reads it. Words
#: that every dictionary the task accepts holds (its prompt's).
PLACEHOLDER_CAPTION = normalize_text(CAPTION_PROMPT)
LABELS = {cls: label for label, cls in SNLI_VE_LABEL_TO_CLASS.items()}
#: OFA's caption evaluation (and the caption task's validation default)
CAPTION_DEFAULTS = {"beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}


class _Records:
    """A reader-like list of records (mue.data.readers' fields) whose images are decoded when read."""

    def __init__(self, inputs: Sequence[ImageInput], fields: Sequence[dict]):
        self.inputs, self.fields = list(inputs), list(fields)

    def __len__(self):
        return len(self.fields)

    def __getitem__(self, i):
        source = self.inputs[i]
        return {"uniq_id": source.name, "image_id": source.key, "image": source.load(), "difficulty": -1,
                **self.fields[i]}


class MueModel:
    """A checkpoint ready to answer (built by ``mue.load``).

    ``thresholds``: the exit knobs used when a call gives none (an ExitConfig; see
    mue.exiting.config). ``model``: the fairseq model; ``tasks``: the fairseq task per kind of question
    ("caption", "snli_ve"); ``last_stats``: the generator's ExitStats of the last call (its batches'
    totals, as fairseq-generate's exit summary).
    """

    def __init__(self, opened: OpenedCheckpoint, checkpoint: str, device: torch.device,
                 thresholds: ExitConfig, image_cache_size: int = 0):
        self.model = opened.model
        self.tasks = opened.tasks
        self.trained_for = opened.trained_for
        self.arch = opened.arch
        self.dict_file = opened.dict_file
        self.checkpoint = checkpoint
        self.device = device
        self.thresholds = thresholds
        self.image_cache = ImageStreamCache(image_cache_size) if image_cache_size else None
        self.last_stats = None

    def __repr__(self):
        return (f"MueModel({self.checkpoint!r}, arch={self.arch}, tasks={sorted(self.tasks)}, "
                f"device={self.device}, thresholds={self.thresholds})")

    # ---- questions -----------------------------------------------------------------------------
    def caption(self, images, beam: int = CAPTION_DEFAULTS["beam"], thresholds=None, batch_size: int = 8,
                progress: Optional[Callable[[int], None]] = None, **generation) -> List[Caption]:
        """Caption ``images`` (one or a list of PIL images, file paths or bytes) with beam search.

        ``generation``: fairseq-generate's generation options by their GenerationConfig names
        (``max_len_b``, ``no_repeat_ngram_size``, ``lenpen``, ``min_len`` ...); the defaults are OFA's caption
        evaluation (beam 5, at most 16 tokens, no repeated 3-grams). ``thresholds``: the exit knobs for
        this call (an ExitConfig or a dict; default: the model's). ``batch_size``: images per batch;
        ``progress``: called with the number of examples of each batch once it is answered.
        """
        task = self._task("caption", "caption")
        inputs = image_inputs(images)
        options = {**CAPTION_DEFAULTS, **generation, "beam": beam}
        records = _Records(inputs, [{"captions": [PLACEHOLDER_CAPTION], "source": i.name} for i in inputs])
        results = []
        for sample, hypos, observer in self._run(task, records, options, thresholds, batch_size, progress,
                                                 beam_search=True):
            bsz = len(hypos)
            layers = observer.token_layers_of_hypotheses(hypos, bsz)
            exits = observer.example_exits(observer.beam_search_owners(bsz), bsz, layers)
            for i, hypo in enumerate(hypos):
                best = hypo[0]
                results.append(Caption(
                    source=sample["uniq_ids"][i], text=normalize_text(task.decode(best["tokens"])),
                    tokens=self._token_texts(task, best["tokens"]), token_ids=best["tokens"].tolist(),
                    token_scores=best["positional_scores"].float().tolist(), score=float(best["score"]),
                    exits=exits[i]))
        return results

    def entail(self, image, hypotheses, premise: Optional[str] = None, thresholds=None, batch_size: int = 8,
               progress: Optional[Callable[[int], None]] = None) -> List[Entailment]:
        """Does ``image`` support each hypothesis? One Entailment per hypothesis: "yes", "no" or "maybe".

        ``image``: one image (PIL, path or bytes) for all hypotheses, or a list with one image per
        hypothesis. ``hypotheses``: a string or a list of them. ``premise``: a text premise, asked with
        OFA's premise prompt (the checkpoint's --add-premise setting decides whether the prompt uses it;
        a premise for a checkpoint trained without one is an error). ``thresholds``, ``batch_size``,
        ``progress``: as for ``caption``.
        """
        task = self._task("snli_ve", "entail")
        hypotheses = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
        if not hypotheses:
            raise OptionError("entail: no hypothesis given")
        inputs = image_inputs(image)
        if len(inputs) == 1:
            inputs = inputs * len(hypotheses)
        if len(inputs) != len(hypotheses):
            raise OptionError(f"entail: {len(inputs)} images for {len(hypotheses)} hypotheses (give one image, or one "
                              "per hypothesis)")
        if premise is not None and not task.cfg.add_premise:
            raise OptionError("entail: this checkpoint answers without a premise (trained without --add-premise)")
        if premise is None and task.cfg.add_premise:
            raise OptionError("entail: this checkpoint was trained with premises (--add-premise): give one")
        records = _Records(inputs, [
            {"hypothesis": h, "premise": premise or "", "label": "entailment",
             "source": f"{i.name}, hypothesis {n + 1} {h!r}"} for n, (i, h) in enumerate(zip(inputs, hypotheses))])
        lengths = [c.numel() for c in task.candidates]
        results = []
        for sample, hypos, observer in self._run(task, records, {}, thresholds, batch_size, progress,
                                                 beam_search=False):
            bsz = len(hypos)
            answers = [self._candidate(task, h[0]["tokens"]) for h in hypos]
            layers = observer.token_layers_of_answers(answers, lengths)
            exits = observer.example_exits(observer.scoring_owners(bsz, lengths), bsz, layers)
            for i, (hypo, j) in enumerate(zip(hypos, answers)):
                best, index = hypo[0], int(sample["id"][i])
                results.append(Entailment(
                    source=sample["uniq_ids"][i], hypothesis=hypotheses[index], premise=premise,
                    answer=SNLI_VE_ANSWERS[j].strip(), label=LABELS[j], tokens=self._token_texts(task, best["tokens"]),
                    token_ids=best["tokens"].tolist(), token_scores=best["positional_scores"].float().tolist(),
                    score=float(best["score"]), exits=exits[i]))
        return results

    # ---- the run ---------------------------------------------------------------------------------
    def _task(self, kind: str, method: str):
        if kind not in self.tasks:
            raise CheckpointMismatchError(
                f"{self.checkpoint} was fine-tuned for {self.trained_for}; {method}() needs a "
                f"{'mue_caption' if kind == 'caption' else 'mue_snli_ve'} checkpoint (or converted OFA weights)")
        return self.tasks[kind]

    def generator(self, task, options: dict, thresholds=None):
        """The generator fairseq-generate would build: ``task.build_generator`` with these generation
        options (GenerationConfig names) and exit knobs (set on the task's config, which owns them)."""
        config = self.thresholds if thresholds is None else exit_config(thresholds)
        for name in EXIT_KNOBS:
            task.cfg[name] = getattr(config, name)
        args = GenerationConfig()
        for name, value in options.items():
            if name not in GenerationConfig.__dataclass_fields__:
                raise OptionError(f"unknown generation option {name!r} (fairseq GenerationConfig fields: beam, "
                                  "max_len_b, min_len, lenpen, no_repeat_ngram_size, ...)")
            setattr(args, name, value)
        generator = task.build_generator([self.model], args)
        if self.image_cache is not None and hasattr(generator, "image_cache"):
            generator.image_cache = self.image_cache
        return generator

    def _run(self, task, records: _Records, options: dict, thresholds, batch_size: int, progress,
             beam_search: bool) -> Iterable[tuple]:
        """Yield (sample, the task's answers, the BatchObserver that watched them) per batch."""
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise OptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        generator = self.generator(task, options, thresholds)
        self.last_stats = generator.stats
        dataset = task.build_dataset(SPLIT, records, is_train=False)
        for start in range(0, len(dataset), int(batch_size)):
            sample = dataset.collater([dataset[i] for i in range(start, min(start + int(batch_size), len(dataset)))])
            for key in ("refs", "labels", "answers"):  # the answers are ours to read: no evaluation collects them
                sample.pop(key, None)
            if self.device.type != "cpu":
                sample = fairseq_utils.apply_to_sample(lambda t: t.to(self.device), sample)
            observer = BatchObserver(generator, self.model)
            with observer.watching(beam_search):
                hypos = task.inference_step(generator, [self.model], sample)
            yield sample, hypos, observer
            if progress is not None:
                progress(len(hypos))

    @staticmethod
    def _token_texts(task, tokens: torch.Tensor) -> List[str]:
        eos = task.dict.eos()
        return ["</s>" if t == eos else task.tokenizer.decode([t], task.dict) for t in tokens.tolist()]

    @staticmethod
    def _candidate(task, tokens: torch.Tensor) -> int:
        for j, candidate in enumerate(task.candidates):
            if torch.equal(candidate.to(tokens.device), tokens):
                return j
        raise RuntimeError(f"the SNLI-VE task answered with tokens {tokens.tolist()}, none of its candidates")
