"""The shared base of mue's vision-language tasks: config, dictionary, data loading, evaluation rules.

What the base owns:
  * ``VisionLanguageConfig``: data location and format, text/image sizes, dictionary; it inherits the
    inference exit knobs from ``mue.exiting.config.ExitConfig`` (their one owner), validated at setup;
  * the options a checkpoint needs to be rebuilt (``REBUILD_DEFAULTS``: codes, bins, image size, lengths,
    imitation heads; SNLI-VE's premise and decoder prompts): fairseq-generate takes them from the checkpoint unless
    given, and refuses a given value that contradicts it (``adopt_checkpoint_options``);
  * ``setup_task``: one dictionary for source and target (``build_ofa_dictionary``: OFA's dict.txt or the
    data's own), the GPT-2 BPE ``Tokenizer``, a check that the task's prompt and answers are in the dict;
  * ``load_dataset``: picks the reader by ``--data-format`` and wraps it in the task's dataset;
  * evaluation scores every example: non-training iterators use a batch-size multiple of 1 and are
    checked to cover the whole split; validation and generation count the evaluated examples, log at the
    split's last batch whether all were evaluated (an error otherwise), and validation logs the count as
    ``eval_examples``;
  * ``make_generator``: the ONE place that chooses the generator (mue.generation's exit-aware generator
    when installed, else fairseq's SequenceGenerator, which refuses exit thresholds < 1);
  * ``build_bpe``: fairseq-generate decodes BPE ids to text with the task's tokenizer (no --bpe needed).
"""
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.logging import metrics
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask
from omegaconf import II, OmegaConf

from mue.data.dictionary import build_ofa_dictionary
from mue.data.readers import CocoCaptionJson, DataError, OfaCaptionTsv, SnliVeJsonl
from mue.data.tokenizer import Tokenizer
from mue.errors import OptionError
from mue.exiting.baselines import attach_imitation_heads
from mue.exiting.config import ExitConfig, as_record, describe, exits_requested
from mue.exiting.config import exit_config as read_exit_config
from mue.exiting.accounting import account, model_sizes, new_stats
from mue.exiting.session import unwrap
from mue.exiting.stats import ExitStats

logger = logging.getLogger(__name__)

DATA_FORMATS = ("auto", "tsv", "coco", "snli_jsonl")
EXIT_PREFIX = "_mue_"  # validation's exit sums in logging outputs (hidden from progress logs by the "_")


@dataclass
class VisionLanguageConfig(ExitConfig):
    data: Optional[str] = field(
        default=None, metadata={"help": "data directory; split files are {data}/{split}.tsv (or see --data-format)"})
    data_format: ChoiceEnum(DATA_FORMATS) = field(
        default="auto", metadata={"help": "tsv: OFA TSV {data}/{split}.tsv; coco: --coco-json + --image-dir "
                                          "(caption); snli_jsonl: {data}/snli_ve_{train,dev,test}.jsonl + "
                                          "--image-dir (SNLI-VE); auto: the first that exists"})
    image_dir: Optional[str] = field(default=None, metadata={"help": "image folder (coco, snli_jsonl)"})
    coco_json: Optional[str] = field(
        default=None, metadata={"help": "Karpathy dataset_coco.json or a COCO annotation json (coco)"})
    selected_cols: Optional[str] = field(
        default=None, metadata={"help": "OFA-style TSV column selection, e.g. '0,4,2' (tsv)"})
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "leave out malformed rows (counted, one warning) instead of failing"})
    dict_file: Optional[str] = field(
        default=None, metadata={"help": "fairseq dict.txt of BPE ids (OFA's works); default {data}/dict.txt "
                                        "or {data}/../dict.txt"})
    # the options of REBUILD_DEFAULTS: None means "not given" (see there)
    num_codes: Optional[int] = field(
        default=None, metadata={"help": "image-code symbols appended to the dictionary (default 8192; "
                                        "fairseq-generate: the checkpoint's)"})
    num_bins: Optional[int] = field(
        default=None, metadata={"help": "location-bin symbols appended to the dictionary (default 1000; "
                                        "fairseq-generate: the checkpoint's)"})
    max_src_length: Optional[int] = field(
        default=None, metadata={"help": "max words of source text (hypothesis, premise) (default 80; "
                                        "fairseq-generate: the checkpoint's)"})
    max_tgt_length: Optional[int] = field(
        default=None, metadata={"help": "max words of a target caption (default 20; fairseq-generate: the "
                                        "checkpoint's)"})
    patch_image_size: Optional[int] = field(
        default=None, metadata={"help": "images are resized to this square side (default 480; fairseq-generate: "
                                        "the checkpoint's)"})
    imitation_hidden: Optional[int] = field(
        default=None, metadata={"help": "hidden size of each imitation head (--exit-policy imitation; 0, the "
                                        "default: the model dimension; fairseq-generate: the checkpoint's)"})
    image_cache_size: int = field(
        default=0, metadata={"help": "keep the image stream of this many recent images across batches (by image "
                                     "id), for data that asks about an image in several batches (0: off)"})
    reference_arch: Optional[str] = field(
        default=None, metadata={"help": "count Eq. 14 and FLOPs against this larger registered arch (e.g. "
                                        "mue_ofa_micro when evaluating an OFA-Tiny baseline mue_ofa_nano)"})
    eval_print_samples: bool = field(default=False, metadata={"help": "log one prediction per validation batch"})
    eval_results: Optional[str] = field(
        default=None, metadata={"help": "json file for the predictions, scores and exit statistics of an "
                                        "evaluation split (one result record for mue.evaluation.report), "
                                        "written when fairseq-generate has scored the whole split"})
    eval_run_name: str = field(
        default="mue", metadata={"help": "run name stored in the --eval-results record (e.g. full, mue, "
                                         "'w/o layer-wise loss'); reports group curves by it"})
    train_subset: str = II("dataset.train_subset")
    seed: int = II("common.seed")


#: Task options that decide how a trained model is rebuilt and fed: the vocabulary layout (image codes,
#: location bins), the image size, the text lengths and the size of the imitation heads. Their fields
#: default to None, "not given", so that a value typed on the command line, even the default's, is told
#: apart from an absent one (comparing with the default could not). ``setup_task`` fills these defaults
#: into what is still None; before that, fairseq-generate fills in what the checkpoint was trained with
#: (``adopt_checkpoint_options``, called by mue.compat's patch ``checkpoint_task_options``).
REBUILD_DEFAULTS = {"num_codes": 8192, "num_bins": 1000, "patch_image_size": 480, "max_src_length": 80,
                    "max_tgt_length": 20, "imitation_hidden": 0}
#: on/off options of the same kind (SNLI-VE's premise prompt and decoder prompt). Off is also what an absent flag gives, so
#: only "on" counts as given.
REBUILD_FLAGS = ("add_premise", "decoder_prompt")
COMMAND_LINE = "the command line"


def fill_rebuild_defaults(cfg) -> None:
    """Put REBUILD_DEFAULTS into the options of ``cfg`` that are still None.

    Also into the task node of the full config that ``cfg`` was copied from: fairseq's ``setup_task`` hands
    the task a merged copy whose parent is the full config, and it is that full config which fairseq-train
    (and fairseq-hydra-train) save into checkpoints, so checkpoints carry the values, not None.
    """
    filled = {}
    for name, default in REBUILD_DEFAULTS.items():
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, default)
            filled[name] = default
    parent = cfg._get_parent() if filled and OmegaConf.is_config(cfg) else None
    source = parent.get("task") if OmegaConf.is_dict(parent) else None
    if OmegaConf.is_dict(source) and source is not cfg and source.get("_name") == cfg.get("_name"):
        for name, value in filled.items():
            if name in source and source[name] is None:
                source[name] = value


def _spell(name: str, value) -> str:
    option = "--" + name.replace("_", "-")
    if name in REBUILD_FLAGS:
        return option if value else f"no {option}"
    return f"{option} {value}"


def adopt_checkpoint_options(cfg, saved, source: str, origin: Optional[dict] = None) -> list:
    """Give ``cfg`` (a task config not set up yet) the rebuild options of ``saved`` (the task config a
    checkpoint was trained with, a mapping) that ``cfg`` does not give; return the names taken.

    ``source`` names the checkpoint; ``origin`` ({name: where its value came from}, updated here) tells
    what gave each value of ``cfg`` so far (absent: the command line), so that the checkpoints of an
    ensemble are checked against each other too. A value given that differs from the saved one is an
    OptionError naming the option and both values: that model cannot be rebuilt with it (codes, bins,
    heads: other shapes) or would be fed inputs unlike those it learned from (image size, lengths, prompt).
    A saved None or a missing entry (a checkpoint older than the option) counts as the default.
    """
    origin = {} if origin is None else origin
    taken, conflicts = [], []
    names = [*REBUILD_DEFAULTS, *(f for f in REBUILD_FLAGS if hasattr(cfg, f))]
    for name in names:
        flag = name in REBUILD_FLAGS
        value = saved.get(name) if hasattr(saved, "get") else None
        if value is None:
            value = False if flag else REBUILD_DEFAULTS[name]
        value = bool(value) if flag else int(value)
        current = getattr(cfg, name, None)
        given = bool(current) if flag else current is not None
        if not given:
            setattr(cfg, name, value)
            origin[name] = source
            taken.append(name)
        elif (bool(current) if flag else int(current)) != value:
            where = origin.get(name, COMMAND_LINE)
            if where == COMMAND_LINE:
                conflicts.append(f"{_spell(name, current)} contradicts {source}, which was trained with "
                                 f"{_spell(name, value)} (leave the option out to use the checkpoint's)")
            else:
                conflicts.append(f"{where} was trained with {_spell(name, current)}, {source} with "
                                 f"{_spell(name, value)}: the checkpoints of an ensemble must agree")
    if conflicts:
        raise OptionError("; ".join(conflicts))
    return taken


def validate_task_options(cfg) -> None:
    """Raise OptionError naming the option when an exit knob (mue.exiting.config.check) or a task option
    about exits is invalid."""
    read_exit_config(cfg)
    if int(cfg.imitation_hidden) < 0:
        raise OptionError(f"--imitation-hidden must be >= 0, got {cfg.imitation_hidden!r}")
    if int(cfg.image_cache_size) < 0:
        raise OptionError(f"--image-cache-size must be >= 0, got {cfg.image_cache_size!r}")
    if cfg.reference_arch:
        from mue.models.mue_ofa import ARCHS

        if cfg.reference_arch not in ARCHS:
            raise OptionError(f"--reference-arch {cfg.reference_arch!r} is not a registered arch; choose from "
                              f"{sorted(ARCHS)}")


def resolve_dict_file(cfg) -> str:
    """--dict-file, else {data}/dict.txt, else {data}/../dict.txt; a clear error naming what was tried."""
    if cfg.dict_file:
        if not os.path.isfile(cfg.dict_file):
            raise DataError(f"--dict-file {cfg.dict_file}: file not found")
        return cfg.dict_file
    tried = [os.path.join(cfg.data, "dict.txt"), os.path.join(cfg.data, os.pardir, "dict.txt")]
    for path in tried:
        if os.path.isfile(path):
            return os.path.normpath(path)
    raise DataError(f"no dictionary found: tried {', '.join(os.path.normpath(p) for p in tried)}; "
                    "give --dict-file (OFA's dict.txt or the data's own)")


class _BpeDecoder:
    """What fairseq-generate's ``decode_fn`` needs: BPE-id strings (from ``Dictionary.string``) -> text."""

    def __init__(self, tokenizer: Tokenizer, dictionary):
        self.tokenizer, self.dict = tokenizer, dictionary

    def decode(self, x: str) -> str:
        return self.tokenizer.decode([self.dict.index(t) for t in x.split()], self.dict).strip()


class VisionLanguageTask(FairseqTask):
    """Base of ``mue_snli_ve`` and ``mue_caption`` (see the module docstring).

    Subclasses set ``TSV_READER`` and implement ``build_dataset(split, reader, is_train)`` and
    ``check_dictionary(path)``.
    """

    TSV_READER = None
    RECORD_TASK = None  # task name in result records: caption | snli_ve
    JSONL_NAMES = ()  # snli_jsonl file names per split, "{split}" filled in

    def __init__(self, cfg: VisionLanguageConfig, dictionary, tokenizer: Tokenizer):
        super().__init__(cfg)
        self.dict = dictionary
        self.tokenizer = tokenizer
        self._eval_progress = {}

    # what a checkpoint needs to be rebuilt: the hook of mue.compat's checkpoint_task_options
    adopt_checkpoint_options = staticmethod(adopt_checkpoint_options)

    @classmethod
    def setup_task(cls, cfg: VisionLanguageConfig, **kwargs):
        from mue import compat

        while compat.NOTES:  # what fairseq-generate took from the checkpoint (logging is set up by now)
            logger.info(compat.NOTES.pop(0))
        fill_rebuild_defaults(cfg)
        validate_task_options(cfg)
        if not cfg.data:
            raise DataError(f"task {cls.__name__}: the data directory (first positional argument) is required")
        if not os.path.isdir(cfg.data):
            raise DataError(f"data directory {cfg.data}: not found")
        dict_path = resolve_dict_file(cfg)
        dictionary = build_ofa_dictionary(dict_path, cfg.num_codes, cfg.num_bins)  # DataError names file:line
        logger.info("dictionary %s: %d entries", dict_path, len(dictionary))
        task = cls(cfg, dictionary, Tokenizer())
        task.check_dictionary(dict_path)
        return task

    def check_dictionary(self, path: str) -> None:
        """Raise DataError if the task's fixed texts (prompt, answers) are not in the dictionary."""
        raise NotImplementedError

    @property
    def source_dictionary(self):
        return self.dict

    @property
    def target_dictionary(self):
        return self.dict

    # ---- data ------------------------------------------------------------------------------
    def jsonl_paths(self, split: str):
        """Candidate SNLI-VE jsonl files of ``split`` (the 'valid' split is read from the 'dev' file)."""
        name = {"valid": "dev"}.get(split, split)
        return [os.path.join(self.cfg.data, pattern.format(split=name)) for pattern in self.JSONL_NAMES]

    def split_files(self, split: str):
        """{format: path} of the existing files that can hold ``split``."""
        cfg = self.cfg
        found = {}
        tsv = os.path.join(cfg.data, f"{split}.tsv")
        if os.path.isfile(tsv):
            found["tsv"] = tsv
        if cfg.coco_json and self.TSV_READER is OfaCaptionTsv:
            found["coco"] = cfg.coco_json
        jsonl = [p for p in self.jsonl_paths(split) if os.path.isfile(p)]
        if jsonl:
            found["snli_jsonl"] = jsonl[0]
        return found

    def open_reader(self, split: str):
        cfg = self.cfg
        found = self.split_files(split)
        fmt = cfg.data_format
        if fmt == "auto":
            fmt = next((f for f in ("tsv", "coco", "snli_jsonl") if f in found), None)
        if fmt not in found:
            expected = {"tsv": os.path.join(cfg.data, f"{split}.tsv"),
                        "coco": "--coco-json (caption task only)",
                        "snli_jsonl": " or ".join(self.jsonl_paths(split)) or "a jsonl file (SNLI-VE task only)"}
            wanted = [expected[f] for f in (("tsv", "coco", "snli_jsonl") if fmt is None else (fmt,))]
            raise DataError(f"split {split!r}: no data file found (format {cfg.data_format}); expected "
                            + "; ".join(wanted))
        if fmt in ("coco", "snli_jsonl") and not cfg.image_dir:
            raise DataError(f"split {split!r}: --data-format {fmt} needs --image-dir")
        path = found[fmt]
        if fmt == "tsv":
            return self.TSV_READER(path, selected_cols=cfg.selected_cols, skip_bad=cfg.skip_bad_rows)
        if fmt == "coco":
            karpathy = {"valid": "val"}.get(split, split)
            return CocoCaptionJson(path, cfg.image_dir, split=karpathy, include_restval=split == cfg.train_subset,
                                   per_caption=split == cfg.train_subset, skip_bad=cfg.skip_bad_rows)
        return SnliVeJsonl(path, cfg.image_dir, skip_bad=cfg.skip_bad_rows)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        reader = self.open_reader(split)
        if len(reader) == 0:
            raise DataError(f"split {split!r}: {getattr(reader, 'path', '')} holds no examples")
        is_train = split == self.cfg.train_subset
        self.datasets[split] = self.build_dataset(split, reader, is_train)
        logger.info("%s: %d examples from %s", split, len(reader), getattr(reader, "path", "?"))

    def build_dataset(self, split: str, reader, is_train: bool):
        raise NotImplementedError

    def dataset_kwargs(self, is_train: bool) -> dict:
        cfg = self.cfg
        return dict(patch_image_size=cfg.patch_image_size, max_src_length=cfg.max_src_length,
                    max_tgt_length=cfg.max_tgt_length, is_train=is_train, seed=cfg.seed)

    def get_batch_iterator(self, dataset, **kwargs):
        """Evaluation iterators score every example: batch-size multiple 1, and a check that the batches
        cover the whole split (fairseq drops a partial last batch when the multiple is > 1). In a single
        process, the evaluation steps are then counted (``count_evaluated``) to check the end result."""
        if getattr(dataset, "is_train", True):
            return super().get_batch_iterator(dataset, **kwargs)
        kwargs["required_batch_size_multiple"] = 1
        epoch_iter = super().get_batch_iterator(dataset, **kwargs)
        batches = epoch_iter.frozen_batches
        covered = sum(len(b) for b in batches)
        if covered != len(dataset):
            raise RuntimeError(f"split {dataset.split!r}: the batches hold {covered} of {len(dataset)} examples; "
                               "evaluation must score all (were examples filtered by size?)")
        if kwargs.get("num_shards", 1) == 1:
            self._eval_progress[dataset.split] = {"batches": len(batches), "expected": len(dataset),
                                                  "steps": 0, "seen": 0}
        else:  # each worker sees a shard: the summed eval_examples metric is the check
            self._eval_progress.pop(dataset.split, None)
        return epoch_iter

    def count_evaluated(self, sample) -> Optional[bool]:
        """Count one evaluated batch; at the split's last batch, log whether every example was evaluated
        and return that (True/False); before it (or when not counted) return None."""
        split = sample.get("split")
        p = self._eval_progress.get(split)
        if p is None:
            return None
        p["steps"] += 1
        p["seen"] += int(sample["nsentences"])
        if p["steps"] < p["batches"]:
            return None
        seen, expected = p["seen"], p["expected"]
        p["steps"] = p["seen"] = 0
        if seen == expected:
            logger.info("split %r: all %d examples evaluated", split, seen)
            return True
        logger.error("split %r: %d of %d examples evaluated", split, seen, expected)
        return False

    def finish_evaluation(self, split, scores: dict, n_examples: int, predictions: list, generator=None):
        """A whole split was scored: print the exit summary and write the --eval-results record."""
        stats = getattr(generator, "stats", None)
        exit_summary = stats.summary() if stats is not None else None
        if stats is not None:
            logger.info("exit summary on %s (%s):\n%s", split, describe(self.cfg), stats.format_table())
            generator.reset_stats()
        if not self.cfg.eval_results:
            return
        record = {
            "task": self.RECORD_TASK, "run": self.cfg.eval_run_name, "split": split,
            "thresholds": as_record(self.cfg),
            "metrics": scores, "n_examples": n_examples, "split_size": len(self.datasets[split]),
            "exit": exit_summary, "predictions": predictions,
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.cfg.eval_results)), exist_ok=True)
        with open(self.cfg.eval_results, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        logger.info("predictions, scores and exit statistics written to %s", self.cfg.eval_results)

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, cfg, from_checkpoint=False):
        """fairseq's model, plus the imitation heads (``decoder.exit_heads``) under --exit-policy imitation."""
        model = super().build_model(cfg, from_checkpoint)
        if not from_checkpoint:  # a model to train: --freeze-embeddings must have pretrained weights to keep
            from mue.models.pretrained_start import warn_if_frozen_from_scratch

            warn_if_frozen_from_scratch(cfg)
        if self.cfg.exit_policy == "imitation":
            attach_imitation_heads(model, self.cfg.imitation_hidden)
        return model

    # ---- generation ------------------------------------------------------------------------
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        return self.make_generator(models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra_gen_cls_kwargs,
                                   prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)

    def make_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                       prefix_allowed_tokens_fn=None):
        """The one place that chooses the generator.

        With ``mue.generation`` installed: its exit-aware ``MueSequenceGenerator`` with this task's exit
        knobs. Without it: fairseq's SequenceGenerator, which cannot exit, so thresholds < 1 are refused.
        """
        extra = dict(extra_gen_cls_kwargs or {})
        if seq_gen_cls is None and importlib.util.find_spec("mue.generation") is not None:
            from mue.generation import MueSequenceGenerator

            seq_gen_cls = MueSequenceGenerator
            extra["exit_config"] = read_exit_config(self.cfg)
            extra["image_cache_size"] = self.cfg.image_cache_size
            extra["reference_arch"] = self.cfg.reference_arch
        elif exits_requested(self.cfg) or self.cfg.reference_arch:
            raise OptionError("exit thresholds < 1 (--img-thres/--txt-thres/--dec-thres), --exit-entropy, "
                             "--exit-patience and --reference-arch need the exit-aware "
                             "generator of mue.generation, which is not available")
        return super().build_generator(models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra,
                                       prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)

    def build_bpe(self, args):
        return _BpeDecoder(self.tokenizer, self.dict)

    def build_tokenizer(self, args):
        return None

    def decode(self, tokens) -> str:
        """Target-side token ids -> text (bos/eos/pad dropped)."""
        return self.tokenizer.decode(tokens, self.dict).strip()

    # ---- training --------------------------------------------------------------------------
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's step; the criterion learns the update count (drop-worst starts after --drop-worst-after)."""
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    # ---- evaluation ------------------------------------------------------------------------
    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        self.count_evaluated(sample)
        logging_output["_eval_cnt"] = sample["nsentences"]
        return loss, sample_size, logging_output

    @staticmethod
    def exit_logging_output(model, trace) -> dict:
        """What a validation batch ran, as summable logging-output entries (``_mue_*``, ExitStats.sums)."""
        inner = unwrap(model)
        stats = account(new_stats(inner), trace, model_sizes(inner))
        return {EXIT_PREFIX + key: value for key, value in stats.sums().items()}

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum(log.get("_eval_cnt", 0) for log in logging_outputs)
        if count:
            metrics.log_scalar_sum("_eval_cnt", count)
            metrics.log_derived("eval_examples", lambda m: int(m["_eval_cnt"].sum))
        exit_keys = {key for log in logging_outputs for key in log if key.startswith(EXIT_PREFIX)}
        if exit_keys:  # the exit summary of validation, summed over batches and workers
            ExitStats.log_sums({key[len(EXIT_PREFIX):]: sum(log.get(key, 0) for log in logging_outputs)
                                for key in exit_keys}, EXIT_PREFIX)

    def split_size(self, sample) -> Optional[int]:
        split = sample.get("split")
        return len(self.datasets[split]) if split in self.datasets else None
