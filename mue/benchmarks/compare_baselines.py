"""MuE against other exit methods and a smaller model, in one harness (captioning or SNLI-VE).

    python scripts/compare_baselines.py OUT --train [--tiny] [--task snli_ve]   # synthetic: train, compare
    python scripts/compare_baselines.py OUT --checkpoints CKPT_DIR              # compare trained ones
    python scripts/compare_baselines.py OUT --task caption --task-data COCO_DIR --checkpoints CKPT_DIR \
        --reference-arch mue_ofa_base --split test --task-args "" --gen-args "--batch-size 64 --beam 5 --fp16"

Runs (one result-record run name each, as the report groups them):
  * "full": the MuE-trained micro model without exits; "mue": MuE (cosine exits in encoder streams and
    decoder, --img/--txt/--dec-thres); "mue (decoder only)": MuE's decoder exit alone (not with --tiny);
  * "entropy (DeeBERT)": --exit-policy entropy swept over --exit-entropy;
  * "patience (PABEE)": --exit-policy patience swept over --exit-patience;
  * "imitation (DeeCap)": --exit-policy imitation over --exit-entropy, with imitation heads trained
    on the frozen MuE backbone (criterion mue_imitation);
  * "OFA-Tiny": a smaller model (mue_ofa_nano, joint encoder, plain last-layer loss) run in full, its
    Eq. 14 and FLOPs counted against the micro model (--reference-arch mue_ofa_micro).
The exit baselines act on the decoder only (the encoder runs in full), as in the MuE paper; all exit
methods share one backbone (trained with MuE's layer-wise loss, so every layer can predict), so they
differ only in the exit rule. Nothing is tuned per method beyond sweeping its own knob.

CKPT_DIR holds mue/checkpoint_last.pt (backbone), imitation/checkpoint_last.pt and
ofa_tiny/checkpoint_last.pt; --train writes them to OUT/checkpoints with fairseq-train's entry point
(in this process), on the synthetic benchmark, each with the task's synthetic recipe (mue/recipes.py).
On real data (--task-data: the task's fairseq data directory, e.g. OFA's COCO or SNLI-VE files) train
them with scripts/train/*.sh: the MuE model, the imitation heads on it (--criterion mue_imitation
--exit-policy imitation --restore-file MUE_CKPT --reset-optimizer, backbone frozen), and mue_ofa_tiny
fine-tuned with --last-layer-only; then compare with --reference-arch set to the MuE model's arch.
Records go to OUT/records (an existing record is reused), the report (tables, plots) to OUT/report,
and the comparison table below is printed and written to OUT/report/comparison.md: per
method and quality level, the largest expected time reduction (Eq. 14) and FLOPs reduction among its
settings that keep that share of the full model's quality (CIDEr, or SNLI-VE accuracy), and whether
MuE is ahead of it there.
"""
import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

PLUGIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this mue package: fairseq's --user-dir

TASKS = {"caption": "mue_caption", "snli_ve": "mue_snli_ve"}
MUE, FULL = "mue", "full"
LEVELS = (0.99, 0.96, 0.9)


ENTROPY, PATIENCE, IMITATION = "entropy (DeeBERT)", "patience (PABEE)", "imitation (DeeCap)"
# Each rule's knob, from saving little to saving much: an entropy bound in nats, a patience in layers
KNOBS = {"full": {"entropy": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], "patience": [4, 3, 2, 1]},
         # the reproduction's (the demo's) shorter sweep: the bounds that save something (on the demo's
         # model, H < 0.25 and 0.5 saved 0.6 % and 1.5 % of the time, patience 3 9.5 %)
         "short": {"entropy": [1.0, 2.0, 3.0], "patience": [2, 1]},
         "tiny": {"entropy": [1.0, 4.0], "patience": [2, 1]}}


def exit_rule_points(grid: str = "full") -> Dict[str, List[List[str]]]:
    """The decoder-exit baselines that need no training of their own, run name -> each point's
    fairseq-generate arguments (the rule's knob over KNOBS[grid]); they run on MuE's model at thresholds
    1.0, so the encoder runs in full."""
    knobs = KNOBS[grid]
    return {ENTROPY: [["--exit-policy", "entropy", "--exit-entropy", f"{s:g}"] for s in knobs["entropy"]],
            PATIENCE: [["--exit-policy", "patience", "--exit-patience", str(p)] for p in knobs["patience"]]}


def plan(tiny: bool, reference_arch: str = "mue_ofa_micro") -> Dict[str, dict]:
    """Run name -> checkpoint, threshold settings and per-point args (each method's own knob)."""
    if tiny:
        mue_settings, dec_only = [(1.0, 1.0, 1.0), (0.9, 0.9, 0.9)], []
    else:
        mue_settings = [(1.0, 1.0, 1.0), (0.995, 0.995, 0.99), (0.99, 0.99, 0.98), (0.98, 0.98, 0.95),
                        (0.97, 0.97, 0.93), (0.96, 0.96, 0.92), (0.95, 0.95, 0.9), (0.9, 0.9, 0.85),
                        (0.8, 0.8, 0.75)]
        dec_only = [(1.0, 1.0, t) for t in (0.99, 0.98, 0.95, 0.9, 0.85, 0.75)]
    entropies = KNOBS["tiny" if tiny else "full"]["entropy"]
    runs = {
        MUE: {"checkpoint": "mue", "settings": mue_settings, "points": [[]]},
        **{run: {"checkpoint": "mue", "settings": [(1.0, 1.0, 1.0)], "points": points}
           for run, points in exit_rule_points("tiny" if tiny else "full").items()},
        IMITATION: {"checkpoint": "imitation", "settings": [(1.0, 1.0, 1.0)],
                    "points": [["--exit-policy", "imitation", "--exit-entropy", f"{s:g}"] for s in entropies]},
        "OFA-Tiny": {"checkpoint": "ofa_tiny", "settings": [(1.0, 1.0, 1.0)],
                     "points": [["--reference-arch", reference_arch]]},
    }
    if dec_only:
        runs["mue (decoder only)"] = {"checkpoint": "mue", "settings": dec_only, "points": [[]]}
    return runs


def sizes(tiny: bool) -> dict:
    """Data and run sizes. Training otherwise follows the synthetic recipes (mue/recipes.py): the caption
    stage-1 and SNLI-VE recipes' epochs, batch and learning rates, as in the demo (without its caption stage 2)."""
    if tiny:
        return {"train": 8, "valid": 4, "test": 4, "image": 32, "updates": 2, "imitation_updates": 3, "batch": 4}
    # 256 validation images: with 64, CIDEr moved by several % between neighbouring settings
    return {"train": 1000, "valid": 256, "test": 64, "image": 64, "updates": None, "imitation_updates": 300,
            "batch": 32}


def model_args(size: dict) -> List[str]:
    """Task arguments training and generation must share on the synthetic benchmark (they fix the
    vocabulary and image size)."""
    return ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", str(size["image"]), "--cpu",
            "--num-workers", "0"]


def default_gen_args(task: str) -> List[str]:
    if task == "caption":
        return ["--batch-size", "16", "--beam", "3", "--max-len-b", "16", "--eval-metrics", "bleu,cider"]
    return ["--batch-size", "16"]


def fairseq_train(argv: Sequence[str]) -> None:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    train.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), list(argv))))


RECIPE_OF = {"caption": "caption_stage1", "snli_ve": "snli_ve"}  # the synthetic recipe each task trains with
NANO = (("--arch", "mue_ofa_nano"),)  # OFA-Tiny's arch in place of the recipe's
NANO_OPTIONS = ["--encoder-mode", "joint", "--last-layer-only"]  # ...trained as vanilla OFA: joint, plain loss


def recipe_argv(data_root: str, on_task: str, size: dict, updates: Optional[int] = None,
                overrides: Sequence[Tuple[str, str]] = (), drop: Sequence[str] = (), extra: Sequence[str] = ()) -> List[str]:
    """fairseq-train arguments of one run on ``on_task``: its synthetic recipe (model, loss, optimiser,
    learning-rate schedule, epochs) at this harness's image size and batch, with ``overrides`` replacing
    recipe values, ``drop`` removing recipe options and ``extra`` appended; ``updates``: stop after that many
    updates instead of the recipe's epochs."""
    from mue import recipes
    from mue.benchmarks.reproduce import count_rows

    r = recipes.recipe(RECIPE_OF[on_task], synthetic=True)
    options = r.train_options(pretrained=False)
    for flag, value in (("--patch-image-size", str(size["image"])), *overrides):
        options = recipes.with_option(options, flag, value)
    for flag in drop:
        options = recipes.without_option(options, flag)
    data = os.path.join(data_root, on_task)
    _, total, warmup = r.schedule(count_rows(os.path.join(data, "train.tsv")), 1, batch_size=size["batch"])
    length = ["--max-update", str(updates), "--max-epoch", "1000"] if updates else ["--max-epoch", str(r.epochs)]
    return [data, "--user-dir", PLUGIN, *options, *extra, "--lr", str(r.lr), "--warmup-updates", str(warmup),
            "--total-num-update", str(total), "--batch-size", str(size["batch"]), "--required-batch-size-multiple",
            "1", "--cpu", "--num-workers", "0", "--disable-validation", "--no-epoch-checkpoints", "--log-format",
            "simple", "--log-interval", "50", "--seed", "1", *length]


def train_models(data_root: str, ckpt_dir: str, size: dict, task: str = "caption", log=print) -> None:
    """The MuE backbone, its imitation heads (backbone frozen) and the OFA-Tiny baseline, via fairseq-train,
    each with the task's synthetic recipe.

    SNLI-VE models fine-tune a caption model of their arch trained with plain cross-entropy (as MuE
    fine-tunes pretrained OFA); they still learn little beyond the hypotheses' wording (mue.benchmarks.demo)."""
    jobs, init = [], {"mue": [], "ofa_tiny": []}
    if task == "snli_ve":
        for name, arch, options in (("pretrain_micro", (), ["--last-layer-only"]), ("pretrain_nano", NANO, NANO_OPTIONS)):
            jobs.append((name, recipe_argv(data_root, "caption", size, size["updates"], arch, extra=options)))
        init = {run: ["--finetune-from-model", os.path.join(ckpt_dir, pre, "checkpoint_last.pt")]
                for run, pre in (("mue", "pretrain_micro"), ("ofa_tiny", "pretrain_nano"))}
    mue_ckpt = os.path.join(ckpt_dir, "mue", "checkpoint_last.pt")
    jobs += [
        ("mue", recipe_argv(data_root, task, size, size["updates"], extra=init["mue"])),
        ("imitation", recipe_argv(
            data_root, task, size, size["imitation_updates"], [("--criterion", "mue_imitation")],
            drop=["--label-smoothing"], extra=["--exit-policy", "imitation", "--restore-file", mue_ckpt,
                                               "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                                               "--reset-lr-scheduler"])),
        ("ofa_tiny", recipe_argv(data_root, task, size, size["updates"], NANO, extra=NANO_OPTIONS + init["ofa_tiny"])),
    ]
    for name, argv in jobs:
        save = os.path.join(ckpt_dir, name)
        if os.path.exists(os.path.join(save, "checkpoint_last.pt")):
            log(f"-- {name}: reusing {save}/checkpoint_last.pt")
            continue
        log(f"-- training {name} ({' '.join(argv[1:])})")
        fairseq_train([*argv, "--save-dir", save])


def run_sweeps(data: str, ckpt_dir: str, out: str, tiny: bool, split: str, task: str, gen: Sequence[str],
               reference_arch: str, log=print) -> List[str]:
    """Every method's sweep through fairseq-generate; `gen`: the generation arguments (task ones included)."""
    from mue.evaluation.sweep import FULL as NO_EXITS, generate_record, sweep

    runs = plan(tiny, reference_arch)
    for run, spec in runs.items():
        ckpt = os.path.join(ckpt_dir, spec["checkpoint"], "checkpoint_last.pt")
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{ckpt}: checkpoint of run {run!r} not found (train with --train)")
    # The process's first generation pays one-off costs (lazy imports, allocator and thread-pool warm-up)
    # that would slow only the full model's timing, the reference of every speedup (or retime_full's):
    # run it once untimed first.
    log("-- warm-up (untimed)")
    os.makedirs(out, exist_ok=True)
    scratch = os.path.join(out, "warmup.json")
    generate_record(data, TASKS[task], os.path.join(ckpt_dir, "mue", "checkpoint_last.pt"), split,
                    NO_EXITS, scratch, "warmup", gen)
    os.remove(scratch)
    shutil.rmtree(os.path.join(out, "generate", "warmup"), ignore_errors=True)
    paths = []
    for run, spec in runs.items():
        ckpt = os.path.join(ckpt_dir, spec["checkpoint"], "checkpoint_last.pt")
        log(f"-- {run}")
        paths += sweep(data, TASKS[task], ckpt, out, spec["settings"], [split], run=run,
                       full_run=FULL if run == MUE else "", extra_args=gen, point_args=spec["points"], log=log)
    return paths


def retime_full(data: str, ckpt_dir: str, out: str, split: str, task: str, gen: Sequence[str]) -> float:
    """Time the full model once more, after the sweeps; returns first timing / this one. Its distance
    from 1 is what timing noise alone does to a speedup on this machine."""
    from mue.evaluation.sweep import FULL as NO_EXITS, generate_record, record_path

    with open(record_path(out, TASKS[task], FULL, split, NO_EXITS, []), encoding="utf-8") as f:
        full = json.load(f)
    scratch = os.path.join(out, "retime.json")
    again = generate_record(data, TASKS[task], os.path.join(ckpt_dir, "mue", "checkpoint_last.pt"), split,
                            NO_EXITS, scratch, "retime", gen)
    os.remove(scratch)
    shutil.rmtree(os.path.join(out, "generate", "retime"), ignore_errors=True)
    return full["exit"]["wall_clock_s"] / again["exit"]["wall_clock_s"]


# The three ways a saving is counted: Eq. 14's layers, FLOPs, and measured wall clock. Each setting is
# timed once, so speedups within SPEEDUP_TIE of each other (or within the re-timed full model's distance
# from 1x, if larger) are called a tie.
CRITERIA = (("etr", "time red."), ("flops_reduction", "FLOPs"), ("speedup", "speedup"))
SPEEDUP_TIE = 0.05


def _best_at(rows: Sequence[dict], run: str, level: float, q_full: float) -> Optional[dict]:
    """`run`'s best value of each criterion among its settings whose quality is >= level x the full
    model's `q_full` (each criterion may pick another setting), and the setting of the largest Eq. 14
    saving; None if no setting keeps the level."""
    from mue.evaluation.records import format_thresholds

    ok = [r for r in rows if r["record"]["run"] == run and r["quality"] >= level * q_full - 1e-12]
    if not ok:
        return None
    best = {key: max((r[key] for r in ok if r[key] is not None), default=None) for key, _ in CRITERIA}
    best["setting"] = format_thresholds(max(ok, key=lambda r: (r["etr"], r["quality"]))["record"]["thresholds"])
    return best


def _verdict(key: str, mue: Optional[float], other: Optional[float], speedup_tie: float = SPEEDUP_TIE) -> str:
    """Who saves more by one criterion: "MuE", "baseline", "tie" or "n/a" (a value is missing)."""
    if mue is None or other is None:
        return "n/a"
    tie = speedup_tie * max(abs(mue), abs(other)) if key == "speedup" else 1e-9
    if abs(mue - other) <= tie:
        return "tie"
    return "MuE" if mue > other else "baseline"


def comparison_table(records: Sequence[dict], task: str = "caption", levels: Sequence[float] = LEVELS,
                     retimed: Optional[float] = None) -> str:
    """Markdown: per method and quality level, its best saving by each criterion (Eq. 14 time reduction,
    FLOPs reduction, measured speedup) among the settings that keep the level, and who is ahead of whom
    by each criterion, MuE or the baseline. `retimed`: retime_full's ratio (widens the speedup tie)."""
    tie = max(SPEEDUP_TIE, abs(1.0 - retimed)) if retimed is not None else SPEEDUP_TIE
    from mue.evaluation.records import find_baseline, quality_key, tradeoff_rows
    from mue.evaluation.tables import SINGLE_TIMING

    rows = tradeoff_rows(records, task)
    q_full = float(find_baseline(records, task)["metrics"][quality_key(task)])
    runs = [r for r in dict.fromkeys(row["record"]["run"] for row in rows) if r != FULL]
    runs.sort(key=lambda name: name != MUE)
    head = ["method", f"kept {quality_key(task)}", "time red. (%)", "FLOPs red. (%)", SINGLE_TIMING,
            "setting (largest time red.)", "ahead: time red. / FLOPs / speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for level in levels:
            mine, ref = _best_at(rows, run, level, q_full), _best_at(rows, MUE, level, q_full)
            if mine is None:
                verdict = "MuE (the baseline keeps no setting here)" if ref is not None and run != MUE else "-"
                cells = ["none keeps it", "-", "-", "-", verdict]
            else:
                if run == MUE:
                    verdict = "-"
                elif ref is None:
                    verdict = "baseline (MuE keeps no setting here)"
                else:
                    verdict = " / ".join(_verdict(key, ref[key], mine[key], tie) for key, _ in CRITERIA)
                cells = [f"{100 * mine['etr']:.1f}",
                         "n/a" if mine["flops_reduction"] is None else f"{100 * mine['flops_reduction']:.1f}",
                         "n/a" if mine["speedup"] is None else f"{mine['speedup']:.2f}", mine["setting"], verdict]
            lines.append("| " + " | ".join([run, f">= {100 * level:g}%"] + cells) + " |")
    lines.append("")
    note = (f"Each criterion's best may come from another setting of the method. Speedups are one timing per "
            f"setting against the full model's; within {100 * tie:.0f}% of each other they count as a tie")
    if retimed is not None:
        note += (f" (the full model, timed again after the sweeps, ran at {retimed:.2f}x of its first timing: "
                 "timing noise alone moves speedups that much)")
    lines.append(note + ".")
    return "\n".join(lines)


SECTION_TITLE = "MuE against decoder-exit baselines (test)"


def section(records_dir: str, runs: Sequence[dict], split: str = "test") -> Dict[str, str]:
    """{title: markdown} for ``render_report``'s extra sections: per task with baseline records in
    ``records_dir``, the comparison table of MuE's and the full model's sweep records among ``runs`` with
    the baselines'; empty when there are none."""
    from mue.evaluation.records import load_records

    if not os.path.isdir(records_dir):
        return {}
    theirs = [r for r in load_records(records_dir) if r.get("split") == split]
    parts = []
    for task in sorted({r["task"] for r in theirs}):
        ours = [r for r in runs if r.get("split") == split and r["task"] == task and r["run"] in (MUE, FULL)]
        if any(r["run"] == FULL for r in ours):  # the full model: every share is of its quality
            parts += [f"### {task}", comparison_table(ours + [r for r in theirs if r["task"] == task], task)]
    if not parts:
        return {}
    intro = ("DeeBERT's entropy rule and PABEE's patience rule exit the decoder of MuE's own final model (the "
             "encoder runs in full), each swept over its own knob; MuE exits by its cosine thresholds in both "
             "encoder streams and the decoder. Each method is shown at its best setting on the test split for "
             "each kept share of the full model's quality: the same after-the-fact choice for every method. "
             "The imitation heads (DeeCap) and a smaller model (OFA-Tiny) need training runs of their own: "
             "`python -m mue.benchmarks.compare_baselines` adds them.")
    return {SECTION_TITLE: "\n\n".join([intro, *parts])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (data, checkpoints, records, report)")
    parser.add_argument("--task", choices=sorted(TASKS), default="caption", help="default caption")
    parser.add_argument("--checkpoints", help="directory with mue/, imitation/, ofa_tiny/ checkpoint_last.pt")
    parser.add_argument("--train", action="store_true",
                        help="train the three models first (into OUT/checkpoints; synthetic benchmark only)")
    parser.add_argument("--data", help="synthetic benchmark directory (default: written to OUT/data)")
    parser.add_argument("--task-data", help="the task's fairseq data directory (real data, e.g. OFA's COCO "
                        "files); needs --checkpoints")
    parser.add_argument("--task-args", help="task arguments of training and generation, one string (default: "
                        "the synthetic benchmark's; give \"\" for OFA's defaults on real data)")
    parser.add_argument("--gen-args", help="generation arguments, one string (default: batch 16; captions also "
                        "beam 3, max_len_b 16, BLEU and CIDEr only)")
    parser.add_argument("--reference-arch", default="mue_ofa_micro",
                        help="arch of the MuE model, OFA-Tiny's Eq. 14 and FLOPs are counted against it "
                             "(default mue_ofa_micro, the synthetic benchmark's)")
    parser.add_argument("--split", default="valid", help="split to evaluate (default valid)")
    parser.add_argument("--tiny", action="store_true", help="tiny data, few updates, two points per method (tests)")
    args = parser.parse_args(argv)
    if not args.train and not args.checkpoints:
        parser.error("give --checkpoints DIR (trained models) or --train")
    if args.task_data and (args.train or args.data):
        parser.error("--task-data (real data) takes trained --checkpoints; --train and --data are for the "
                     "synthetic benchmark")
    if args.task_data and not os.path.isdir(args.task_data):
        parser.error(f"--task-data {args.task_data}: no such directory")
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's INFO logs drown the comparison
    import mue  # noqa: F401  (registers the plugin)
    from mue.data.synthetic import generate
    from mue.evaluation.records import load_records, quality_key
    from mue.evaluation.report import render_report

    size = sizes(args.tiny)
    if args.task_data:
        data = args.task_data
    else:
        data_root = args.data or os.path.join(args.out, "data")
        if not os.path.isfile(os.path.join(data_root, "dict.txt")):
            generate(data_root, num_train=size["train"], num_valid=size["valid"], num_test=size["test"],
                     image_size=size["image"])
        data = os.path.join(data_root, args.task)
    task_args = model_args(size) if args.task_args is None else shlex.split(args.task_args)
    gen = [*task_args, *(default_gen_args(args.task) if args.gen_args is None else shlex.split(args.gen_args))]
    ckpt_dir = args.checkpoints or os.path.join(args.out, "checkpoints")
    if args.train:
        train_models(data_root, ckpt_dir, size, args.task)
    records_dir = os.path.join(args.out, "records")
    paths = run_sweeps(data, ckpt_dir, records_dir, args.tiny, args.split, args.task, gen, args.reference_arch)
    retimed = retime_full(data, ckpt_dir, records_dir, args.split, args.task, gen)
    records = load_records(paths)
    report_dir = os.path.join(args.out, "report")
    where = "synthetic" if not args.task_data else os.path.basename(os.path.normpath(args.task_data))
    headline = render_report(records, report_dir,
                             title=f"MuE vs exit baselines and OFA-Tiny ({args.task}, {where})")
    table = comparison_table(records, args.task, retimed=retimed)
    with open(os.path.join(report_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(headline)
    print(f"\n## Best saving per method at each kept share of the full model's {quality_key(args.task)}\n")
    print(table)
    print(f"\nreport written to {report_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
