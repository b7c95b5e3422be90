"""The training recipes: each task's and stage's hyper-parameters, for the paper's runs on OFA-base ("real")
and for their small CPU versions on the synthetic scenes ("synthetic", what `make demo` trains).

This table is the one place they are written. scripts/train/*.sh read it through this module's command line
(``python -m mue.recipes NAME [--synthetic] [--pretrained]`` prints shell assignments), scripts/reproduce.py
imports it, and tests/test_recipes.py checks that configs/*.yaml say the same. docs/OFA.md ("MuE reference
runs") gives the sources of the real values.

What is not here belongs to whoever launches a run: data and save folders, processes and devices, logging,
the start checkpoint, cache files, whether to validate.
"""
import argparse
import dataclasses
import shlex
from typing import Dict, List, Optional, Sequence, Tuple

# Shared by every recipe: OFA's optimiser and clipping, a polynomial learning-rate decay after a warm-up.
OPTIMIZER = ("--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-08", "--weight-decay", "0.01",
             "--clip-norm", "1.0", "--lr-scheduler", "polynomial_decay")
TEXT_LENGTHS = ("--max-src-length", "80", "--max-tgt-length", "20")
MODELS = {
    "real": ("--arch", "mue_ofa_base", "--patch-image-size", "480"),
    # from scratch, no image codes or location bins (the scenes need neither)
    "synthetic": ("--arch", "mue_ofa_micro", "--patch-image-size", "64", "--num-codes", "0", "--num-bins", "0"),
}
CAPTION_DECODING = '{{"beam": {beam}, "max_len_b": 16, "no_repeat_ngram_size": 3}}'


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One fairseq-train stage. ``options`` are the stage's own fairseq-train options (model, loss,
    regularisation, validation); the other fields are the ones launchers let a user override."""
    task: str
    lr: float
    epochs: int
    batch_size: int  # sentences per process and step
    effective_batch: Optional[int]  # sentences per update over all processes; None: one step per update
    options: Tuple[str, ...]
    # --freeze-embeddings when the run starts from pretrained (OFA) weights: the embedding is tied to the
    # output projection, so frozen from scratch it would stay a random output layer
    freeze_pretrained_embeddings: bool = False
    warmup_ratio: float = 0.06  # warm-up share of the run's updates (OFA's)
    warmup_updates: Optional[int] = None  # a fixed warm-up instead of the ratio
    decay_updates: Optional[int] = None  # decay over this many updates instead of over the run

    def train_options(self, pretrained: bool) -> List[str]:
        """The stage's fairseq-train options, the shared optimiser included; ``pretrained``: the run
        fine-tunes loaded weights (--finetune-from-model)."""
        freeze = ["--freeze-embeddings"] if self.freeze_pretrained_embeddings and pretrained else []
        return ["--task", self.task, *self.options, *freeze, *OPTIMIZER]

    def schedule(self, rows: int, nproc: int, batch_size: Optional[int] = None, epochs: Optional[int] = None,
                 effective_batch: Optional[int] = None) -> Tuple[int, int, int]:
        """(update_freq, total updates for polynomial decay, warm-up updates) for ``rows`` training rows on
        ``nproc`` processes, counting updates as fairseq batches them."""
        batch = batch_size or self.batch_size
        per_step = batch * nproc
        effective = effective_batch or self.effective_batch or per_step
        if effective % per_step:
            raise ValueError(f"effective batch {effective} is not a multiple of batch size x processes "
                             f"= {batch} x {nproc}")
        update_freq = effective // per_step
        steps = -(-rows // per_step)
        total = -(-steps // update_freq) * (epochs or self.epochs)
        if self.decay_updates:
            total = self.decay_updates
        warmup = self.warmup_updates if self.warmup_updates is not None else int(self.warmup_ratio * total)
        return update_freq, total, warmup


def _caption_validation(beam: int) -> Tuple[str, ...]:
    return ("--eval-cider", "--eval-args", CAPTION_DECODING.format(beam=beam),
            "--best-checkpoint-metric", "cider", "--maximize-best-checkpoint-metric")


def _regularisation(dropout: str, drop_path: str) -> Tuple[str, ...]:
    return ("--dropout", dropout, "--attention-dropout", "0.0", "--encoder-drop-path-rate", drop_path,
            "--decoder-drop-path-rate", drop_path)


SNLI_VE_VALIDATION = ("--best-checkpoint-metric", "snli_score", "--maximize-best-checkpoint-metric")


def _scst(ce_weight: str) -> Tuple[str, ...]:
    """Stage 2: beam search's 5 best captions per image, each against the leave-one-out baseline of the
    others; ``ce_weight`` > 0 adds the layer-wise cross-entropy of the ground truth."""
    return ("--criterion", "mue_scst", "--scst-samples", "5", "--scst-beam", "--scst-ce-weight", ce_weight)


# The synthetic versions keep the real recipes' losses and shapes, and differ where a micro model trained from
# scratch for minutes on the CPU needs it: higher learning rates, bigger batches of one step per update, a
# fixed 50-update warm-up then a nearly constant rate (decay over 100,000 updates), no drop-path, no
# drop-worst (it starts after 6,000 updates), validation beam 2; stage 2 for one epoch. SNLI-VE
# leaves out --decoder-prompt: on the scenes it changed nothing (valid 66.8 % with it after 4 and after 9
# epochs, 67.2 % without, all answering from the wording) and the longer decoder input does not fit the
# demo's budget. SNLI-VE trains 3 epochs: its valid accuracy was flat from the second (65.8, 64.8, 67.2).
RECIPES: Dict[str, Dict[str, Recipe]] = {
    "snli_ve": {
        # OFA's SNLI-VE runs feed the question to the decoder too (prompt type prev_output): --decoder-prompt
        "real": Recipe("mue_snli_ve", 5e-5, 5, 8, 64, (
            *MODELS["real"], *TEXT_LENGTHS, "--decoder-prompt", "--criterion", "mue", "--label-smoothing", "0.0",
            *_regularisation("0.1", "0.1"), *SNLI_VE_VALIDATION)),
        "synthetic": Recipe("mue_snli_ve", 1e-3, 3, 32, None, (
            *MODELS["synthetic"], *TEXT_LENGTHS, "--criterion", "mue", "--label-smoothing", "0.0",
            *_regularisation("0.1", "0.0"), *SNLI_VE_VALIDATION), warmup_updates=50, decay_updates=100000),
    },
    "caption_stage1": {
        # OFA's drop-worst: after 6,000 updates each layer's loss leaves out its 20 % highest-loss tokens
        "real": Recipe("mue_caption", 1e-5, 5, 8, 64, (
            *MODELS["real"], *TEXT_LENGTHS, "--criterion", "mue", "--label-smoothing", "0.1",
            "--drop-worst-ratio", "0.2", "--drop-worst-after", "6000", *_regularisation("0.1", "0.1"),
            *_caption_validation(5)), freeze_pretrained_embeddings=True),
        # lr 3e-4, not 1e-3: at 1e-3 the model learns the captions' grammar fast and the image slowly (on
        # one-object scenes the valid loss was the same with the wrong image at 3e-3); at 3e-4 it reads the
        # scenes' objects and its shallow layers fall behind the full model
        "synthetic": Recipe("mue_caption", 3e-4, 3, 32, None, (
            *MODELS["synthetic"], *TEXT_LENGTHS, "--criterion", "mue", "--label-smoothing", "0.1",
            *_regularisation("0.1", "0.0"), *_caption_validation(2)),
            freeze_pretrained_embeddings=True, warmup_updates=50, decay_updates=100000),
    },
    "caption_stage2": {
        "real": Recipe("mue_caption", 1e-5, 3, 2, 64, (
            *MODELS["real"], *TEXT_LENGTHS, *_scst("0.0"), *_regularisation("0.0", "0.0"),
            *_caption_validation(5)),
            freeze_pretrained_embeddings=True),
        # lr 3e-5 and half the layer-wise cross-entropy kept: at 1e-4 without it, SCST lifted the shallow layers
        # to the full model (layer 2 at 99 % of layer 6 on 300 valid images, 83 % after stage 1); at 3e-5 with
        # CE 0.5, layer 2 kept 81 % and the full model scored higher (CIDEr 175.7 against 160.6); in the demo
        # of 7 December 2026, 85.5 % on test
        "synthetic": Recipe("mue_caption", 3e-5, 1, 32, None, (
            *MODELS["synthetic"], *TEXT_LENGTHS, *_scst("0.5"), *_regularisation("0.0", "0.0"),
            *_caption_validation(2)),
            freeze_pretrained_embeddings=True, warmup_updates=50, decay_updates=100000),
    },
}


def recipe(name: str, synthetic: bool = False) -> Recipe:
    """The recipe of stage ``name`` (snli_ve, caption_stage1, caption_stage2), real or synthetic."""
    if name not in RECIPES:
        raise KeyError(f"no recipe {name!r}; there are {', '.join(RECIPES)}")
    return RECIPES[name]["synthetic" if synthetic else "real"]


def _flag_index(options: Sequence[str], flag: str) -> int:
    """Where ``flag`` stands in ``options``; a KeyError naming it when the recipe has no such option."""
    if flag not in options:
        raise KeyError(f"{flag} is not an option of this recipe")
    return list(options).index(flag)


def with_option(options: Sequence[str], flag: str, value: str) -> List[str]:
    """``options`` with ``flag``'s value replaced (the flag must be there), so a launcher's override is
    given once rather than appended after the recipe's."""
    options = list(options)
    options[_flag_index(options, flag) + 1] = value
    return options


def option_value(options: Sequence[str], flag: str) -> str:
    """``flag``'s value in ``options`` (the flag must be there)."""
    return options[_flag_index(options, flag) + 1]


def without_option(options: Sequence[str], flag: str) -> List[str]:
    """``options`` without ``flag`` and its value (the flag must be there): for a run whose loss has no use
    for it (e.g. --label-smoothing under another criterion)."""
    options = list(options)
    i = _flag_index(options, flag)
    return options[:i] + options[i + 2:]


def shell_assignments(name: str, synthetic: bool, pretrained: bool, overrides: Sequence[Tuple[str, str]] = ()) -> str:
    """Bash assignments of a recipe, for scripts/train/*.sh: RECIPE_{LR,EPOCHS,BATCH_SIZE,EFFECTIVE_BATCH,
    WARMUP_RATIO,WARMUP_UPDATES,DECAY_UPDATES} (empty when unset) and the array RECIPE_ARGS."""
    r = recipe(name, synthetic)
    options = r.train_options(pretrained)
    for flag, value in overrides:
        options = with_option(options, flag, value)
    values = {"LR": r.lr, "EPOCHS": r.epochs, "BATCH_SIZE": r.batch_size, "EFFECTIVE_BATCH": r.effective_batch,
              "WARMUP_RATIO": r.warmup_ratio, "WARMUP_UPDATES": r.warmup_updates, "DECAY_UPDATES": r.decay_updates}
    lines = [f"RECIPE_{key}={'' if value is None else shlex.quote(str(value))}" for key, value in values.items()]
    lines.append("RECIPE_ARGS=(" + " ".join(shlex.quote(o) for o in options) + ")")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print a training recipe as bash assignments (for scripts/train/*.sh).")
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--synthetic", action="store_true", help="the CPU version on the synthetic scenes")
    p.add_argument("--pretrained", action="store_true", help="the run starts from pretrained weights")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="replace a recipe option's value, e.g. --set scst-ce-weight=0.5")
    args = p.parse_args(argv)
    overrides = []
    for item in args.set:
        flag, sep, value = item.partition("=")
        if not sep or not flag:
            p.error(f"--set {item!r}: expected OPTION=VALUE, e.g. scst-ce-weight=0.5")
        overrides.append(("--" + flag.lstrip("-"), value))
    try:
        print(shell_assignments(args.name, args.synthetic, args.pretrained, overrides))
    except KeyError as e:
        p.error(str(e.args[0]))


if __name__ == "__main__":
    main()
