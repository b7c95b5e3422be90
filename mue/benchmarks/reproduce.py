"""Reproduce the paper's tables for one task: train MuE and its two ablations, sweep thresholds, report.
The logic of scripts/reproduce.py (and of the demo's runs, mue.benchmarks.demo).

    scripts/reproduce.py --task {snli_ve,caption} --data DIR --out DIR [--ofa-checkpoint CKPT] [--ngpu N]
                         [--synthetic] [--tiny] [fairseq-train options...]

  1. data      real data: OFA's TSVs DIR/{train,valid,test}.tsv (+ dict.txt), nothing is downloaded;
               --synthetic: the built-in shape scenes (python -m mue.data.synthetic into DIR when missing)
  2. train     fairseq-train, three runs: "mue" (decomposed encoder, criterion `mue`: layer-wise loss),
               "w/o decomposition" (--encoder-mode joint, trained that way) and "w/o layer-wise loss"
               (--last-layer-only); caption on real data adds stage 2 (self-critical, criterion mue_scst)
  3. evaluate  threshold sweeps with mue.evaluation.sweep (in-process fairseq-generate) on dev and test;
               one JSON record per setting in OUT/runs; MuE's model cut to K = 1..L-1 layers on test
               (--exit-depth K; OUT/forced_depth, off with --no-forced-depth); caption stage 1 on test
               against stage 2 (OUT/stages); the decoder-exit baselines DeeBERT (entropy) and PABEE
               (patience) on MuE's model on test (OUT/baselines, off with --no-baselines)
  4. report    OUT/report.md (mue.evaluation.report) and OUT/paper_tables.md with Tables 1-4 and the
               figures (mue.evaluation.paper_tables); Table 1 is printed at the end

The hyper-parameters are those of mue/recipes.py (one table for this script, scripts/train/*.sh and
configs/*.yaml): on real data the MuE reference runs (docs/OFA.md, "MuE reference runs"), OFA-base, 480 px,
effective batch 64, polynomial decay with 6 % warm-up; --ofa-checkpoint is an official OFA checkpoint
converted with `python -m mue.checkpoints.convert_ofa` and loaded with --finetune-from-model (without it the
runs start from scratch, which cannot give the paper's numbers). --synthetic: their CPU versions,
mue_ofa_micro from scratch, 64 px images (what scripts/demo.py runs), without validation.

Options this script does not know are fairseq-train options appended to every training command (they win
over the recipe, e.g. `--arch mue_ofa_micro --patch-image-size 64 --max-epoch 1`); those that are options of
the task (e.g. --patch-image-size, --num-codes, --eval-metrics) also go to every fairseq-generate.

Each stage is skipped when its output exists (a training run's `done` marker, a sweep record); --fresh
redoes the task's runs. Deterministic given --seed.
"""
import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from mue import recipes
from mue.benchmarks import child_env
from mue.benchmarks.progress import Progress
from mue.exiting.config import option
from mue.recipes import Recipe

PLUGIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this mue package: fairseq's --user-dir
BIN = os.path.dirname(sys.executable)

TASKS = {"snli_ve": "mue_snli_ve", "caption": "mue_caption"}
# run name (as in the records and tables) -> (checkpoint folder suffix, fairseq-train options of the run)
RUNS = {
    "mue": ("mue", []),
    "w/o decomposition": ("joint", ["--encoder-mode", "joint"]),
    "w/o layer-wise loss": ("lastlayer", ["--last-layer-only"]),
}
FULL = (1.0, 1.0, 1.0)
STAGE_TARGET = 0.99  # the stage comparison reports MuE at the dev setting keeping this share of full CIDEr

# ------------------------------------------------------------------------------------------------------
# Threshold sweeps, (image, text, decoder). "mue" is swept densely (Tables 1-3: trade-off, image vs text
# depth), the ablations on a coarser grid (Table 4). The all-1.0 setting comes first: the full model.
SWEEPS = {
    "synthetic": {
        # the diagonal, each stream alone, and the image stream whole while the text stream and the decoder
        # exit: on the scenes the image stream is where depth pays (captions, 300 valid images: 0.95 on the
        # image stream alone lost 15 % of CIDEr at 14 % expected time reduction; text and decoder at 0.9 lost
        # 2.6 % at 50 %, in another training run of the same recipe)
        "mue": [FULL, (0.995, 0.995, 0.995), (0.99, 0.99, 0.99), (0.98, 0.98, 0.98), (0.95, 0.95, 0.95),
                (0.9, 1.0, 1.0), (1.0, 0.9, 1.0), (1.0, 0.9, 0.9)],
        "ablation": [FULL, (0.99, 0.99, 0.99), (0.95, 0.95, 0.95)],
    },
    # real data: the reference scripts' and the paper appendix's settings, a diagonal, and encoder-only
    # settings for Table 2
    "snli_ve": {
        "mue": [FULL, (0.7, 0.99, 0.7), (0.9, 0.95, 0.95), (0.99, 0.99, 0.99), (0.95, 0.95, 0.9),
                (0.9, 0.9, 0.8), (0.8, 0.8, 0.7), (0.9, 1.0, 1.0), (0.7, 1.0, 1.0), (1.0, 0.95, 1.0),
                (1.0, 0.8, 1.0)],
        "ablation": [FULL, (0.9, 0.95, 0.95), (0.95, 0.95, 0.9), (0.9, 0.9, 0.8), (0.7, 0.99, 0.7)],
    },
    "caption": {
        "mue": [FULL, (0.99, 0.7, 0.9), (0.99, 0.99, 0.99), (0.99, 0.95, 0.95), (0.95, 0.9, 0.9),
                (0.9, 0.8, 0.85), (0.99, 1.0, 1.0), (0.95, 1.0, 1.0), (1.0, 0.9, 1.0), (1.0, 0.7, 1.0)],
        "ablation": [FULL, (0.99, 0.99, 0.99), (0.99, 0.95, 0.95), (0.99, 0.7, 0.9), (0.95, 0.9, 0.9)],
    },
    "tiny": {"mue": [FULL, (0.9, 0.9, 0.9)], "ablation": [FULL, (0.9, 0.9, 0.9)]},
}
# Caption generation as in the reference runs, with the paper's decaying decoder threshold: theta from the
# setting, beta 0.95, tau 1, decaying over N = the longest caption generated (max_len_b). CAPTION_KNOBS are
# its exit knobs (what the timed repeats take), CAPTION_GENERATION its fairseq-generate options.
MAX_CAPTION_LEN = 16
CAPTION_KNOBS = {"dec_schedule": "decay", "dec_decay_beta": 0.95, "dec_decay_tau": 1.0, "dec_decay_len": MAX_CAPTION_LEN}
CAPTION_GENERATION = ["--beam", "5", "--max-len-b", str(MAX_CAPTION_LEN), "--no-repeat-ngram-size", "3",
                      *[token for knob, value in CAPTION_KNOBS.items() for token in (option(knob), str(value))]]


# ------------------------------------------------------------------------------------------ recipes
@dataclasses.dataclass
class Stage:
    """One fairseq-train invocation of a run: its name and its recipe (mue.recipes) with this call's
    overrides (epochs, batch size, learning rate, options) applied."""
    name: str
    recipe: Recipe
    options: List[str]


def stages(task: str, args) -> List[Stage]:
    """The run's stages: SNLI-VE's one, or caption stage 1 then stage 2 (self-critical). Real data: the MuE
    reference runs (--scst-epochs 0 leaves stage 2 out); --synthetic: the CPU versions, mue_ofa_micro from
    scratch, stage 2 only with --scst-epochs N. A chain that starts from --ofa-checkpoint on real data keeps
    the pretrained embeddings frozen where the recipe says so."""
    synthetic = args.synthetic
    pretrained = bool(args.ofa_checkpoint) and not synthetic
    if task == "snli_ve":
        plan = [("snli_ve", "snli_ve", args.epochs, args.batch_size, args.lr)]
    else:
        plan = [("stage1", "caption_stage1", args.epochs, args.batch_size, args.lr)]
        if args.scst_epochs if synthetic else args.scst_epochs != 0:
            # real stage 2 keeps the paper's batch and rate; the synthetic one takes --batch-size and --scst-lr
            plan.append(("stage2", "caption_stage2", args.scst_epochs, args.batch_size if synthetic else None,
                         args.scst_lr if synthetic else None))
        elif synthetic:
            plan = [("caption", *plan[0][1:])]
    made = []
    for name, recipe_name, epochs, batch_size, lr in plan:
        r = recipes.recipe(recipe_name, synthetic)
        r = dataclasses.replace(r, epochs=epochs or r.epochs, batch_size=batch_size or r.batch_size, lr=lr or r.lr)
        options = r.train_options(pretrained)
        if synthetic:  # the demo: no validation (the last checkpoint is evaluated), the scenes' image size
            options = recipes.with_option(options, "--patch-image-size", str(args.image_size))
            options.append("--disable-validation")
        if recipe_name == "caption_stage2" and args.scst_ce_weight is not None:
            options = recipes.with_option(options, "--scst-ce-weight", str(args.scst_ce_weight))
        made.append(Stage(name, r, options))
    return made


# ------------------------------------------------------------------------------------------ helpers
def run_logged(cmd: Sequence[str], log_path: str, threads: Optional[int] = None, tag: str = "") -> None:
    """Run a command, keep its full log, echo fairseq's progress lines (after ``tag``, when commands run side
    by side); fail naming the log. ``threads``: the command's CPU threads (OMP_NUM_THREADS), else inherited."""
    print("$ " + " ".join(cmd), flush=True)
    # subprocesses import this same mue (python -m mue.data.synthetic), installed or not
    env = child_env()
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    prefix = f"   [{tag}] " if tag else "   "
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if any(key in line for key in ("| INFO | train |", "| INFO | valid |", "done training", "Error")):
                print(prefix + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); see {log_path}")


def task_option_names(fairseq_task: str) -> set:
    """Option names (--x-y) of a task's dataclass: pass-through options that fairseq-generate needs too."""
    import mue  # noqa: F401  (registers the tasks)
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TASK_DATACLASS_REGISTRY[fairseq_task])}


def split_task_options(extra: Sequence[str], names: set) -> List[str]:
    """The task options among pass-through fairseq-train options, each with its values."""
    picked, keep = [], False
    for token in extra:
        if token.startswith("--"):
            keep = token.split("=", 1)[0] in names
        if keep:
            picked.append(token)
    return picked


def count_rows(path: str) -> int:
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: training file not found (the real-data path reads OFA's TSVs "
                         f"DATA/{{train,valid,test}}.tsv; it sizes the learning-rate schedule from train.tsv)")
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------ stages
def make_synthetic_data(args) -> None:
    """Write the shape scenes into --data unless they are there (meta.json)."""
    if os.path.exists(os.path.join(args.data, "meta.json")):
        print(f"reusing {args.data}")
        return
    os.makedirs(args.data, exist_ok=True)
    run_logged([sys.executable, "-m", "mue.data.synthetic", "--out", args.data, "--seed", str(args.seed),
                "--num-train", str(args.num_train), "--num-valid", str(args.num_eval), "--num-test",
                str(args.num_test or args.num_eval), "--image-size", str(args.image_size)],
               os.path.join(args.data, "synthetic.log"))


def task_data(args) -> str:
    return os.path.join(args.data, args.task) if args.synthetic else args.data


def run_folder(out: str, task: str, run: str, stage: str = None) -> str:
    """Where a run saves its checkpoints: OUT/checkpoints/TASK_RUN for its last stage, TASK_RUN_STAGE for an
    earlier one (e.g. mue_caption_mue_stage1, then mue_caption_mue)."""
    name = f"{TASKS[task]}_{RUNS[run][0]}" + (f"_{stage}" if stage else "")
    return os.path.join(out, "checkpoints", name)


def cpu_threads() -> int:
    """The CPU threads this process may use: OMP_NUM_THREADS when set, else the cores it may run on."""
    setting = os.environ.get("OMP_NUM_THREADS", "")
    if setting.isdigit() and int(setting) > 0:
        return int(setting)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_runs(args, extra: Sequence[str]) -> Dict[str, List[str]]:
    """{run: its stages' checkpoints} for every run of args.runs (train_run), --parallel-runs of them side by
    side, each with an equal share of the CPU threads. On a small CPU two one-thread trainings at once get
    more done than one two-thread training after the other (1.4x the throughput, measured once on 2 cores)."""
    jobs = min(args.parallel_runs, len(args.runs))
    if jobs <= 1:
        return {run: train_run(args, run, extra) for run in args.runs}
    threads = max(1, cpu_threads() // jobs)
    print(f"training {jobs} runs side by side, {threads} CPU thread(s) each", flush=True)

    def train(run):
        try:
            return train_run(args, run, extra, threads=threads)
        except SystemExit as err:  # say it now: the other runs go on, and the error is raised after them
            print(f"   [{run}] failed: {err}", flush=True)
            raise

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {run: pool.submit(train, run) for run in args.runs}
        return {run: future.result() for run, future in futures.items()}


def train_run(args, run: str, extra: Sequence[str], threads: Optional[int] = None) -> List[str]:
    """Train one run (all its stages, each skipped when done); return each stage's checkpoint, the last
    being the one to evaluate (each in its run_folder). ``threads``: CPU threads per command (side by side
    with other runs; see train_runs), else inherited."""
    run_options = RUNS[run][1]
    run_stages = stages(args.task, args)
    data = task_data(args)
    init = args.ofa_checkpoint
    ckpts = []
    for i, st in enumerate(run_stages):
        save_dir = run_folder(args.out, args.task, run, st.name if i < len(run_stages) - 1 else None)
        ckpt = os.path.join(save_dir, "checkpoint_last.pt" if args.synthetic else "checkpoint_best.pt")
        done = os.path.join(save_dir, "done")
        ckpts.append(ckpt)
        if os.path.exists(done):
            print(f"reusing {ckpt}")
            init = ckpt
            continue
        os.makedirs(save_dir, exist_ok=True)
        nproc = max(1, args.ngpu)
        r = st.recipe
        effective = None if args.synthetic else args.effective_batch or r.effective_batch
        batch = min(r.batch_size, effective) if effective else r.batch_size
        try:
            update_freq, total, warmup = r.schedule(count_rows(os.path.join(data, "train.tsv")), nproc,
                                                    batch_size=batch, effective_batch=effective)
        except ValueError as err:
            raise SystemExit(f"{run}, {st.name}: {err}")
        cmd = [os.path.join(BIN, "fairseq-train"), data, "--user-dir", PLUGIN, *st.options,
               "--lr", str(r.lr), "--warmup-updates", str(warmup), "--total-num-update", str(total),
               "--max-epoch", str(r.epochs), "--batch-size", str(batch), "--update-freq", str(update_freq),
               "--required-batch-size-multiple", "1", "--save-dir", save_dir, "--no-epoch-checkpoints",
               "--seed", str(args.seed), "--num-workers", str(args.num_workers), "--log-format", "simple",
               "--log-interval", "50" if args.synthetic else "10"]
        if st.name == "stage2":
            cmd += ["--scst-cider-df", os.path.join(args.out, "checkpoints", "cider_d_df.json"),
                    "--scst-refs", os.path.join(args.out, "checkpoints", "train_refs.sqlite")]
        if init:
            cmd += ["--finetune-from-model", init]
        if args.ngpu == 0:
            cmd += ["--cpu"]
        cmd += [*run_options, *extra]
        if args.ngpu > 1:
            cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(args.ngpu), *cmd,
                   "--distributed-world-size", str(args.ngpu)]
        print(f"-- {run}: {st.name} ({r.epochs} epoch(s))", flush=True)
        start = time.time()
        run_logged(cmd, os.path.join(save_dir, "train.log"), threads=threads, tag=run if threads else "")
        if not os.path.exists(ckpt):
            raise SystemExit(f"fairseq-train wrote no {ckpt}; see {os.path.join(save_dir, 'train.log')}")
        with open(done, "w") as f:
            f.write(f"{time.time() - start:.1f}\n")
        init = ckpt
    return ckpts


def generate_args(args, generate_extra: Sequence[str]) -> List[str]:
    """fairseq-generate options of every evaluation of the task (sizes, decoding, metrics)."""
    extra = ["--batch-size", str(args.eval_batch_size), "--num-workers", str(args.num_workers), "--quiet"]
    if args.synthetic:
        extra += ["--patch-image-size", str(args.image_size), "--num-codes", "0", "--num-bins", "0"]
    else:
        extra += ["--patch-image-size", "480", "--max-src-length", "80", "--max-tgt-length", "20"]
    if args.ngpu == 0:
        extra += ["--cpu"]
    if args.task == "caption":
        extra += CAPTION_GENERATION
        if args.synthetic:  # METEOR starts a JVM per run; SPICE needs jars the synthetic path cannot fetch
            extra += ["--eval-metrics", "bleu,rouge,cider"]
    return [*extra, *generate_extra]


def evaluate_run(args, run: str, ckpt: str, generate_extra: Sequence[str]) -> None:
    """Sweep the run's thresholds on the dev and test splits (records in OUT/runs)."""
    from mue.evaluation.sweep import sweep

    grid = SWEEPS["tiny" if args.tiny else "synthetic" if args.synthetic else args.task]
    settings = grid["mue" if run == "mue" else "ablation"]
    sweep(task_data(args), TASKS[args.task], ckpt, os.path.join(args.out, "runs"), settings,
          (args.dev_split, args.test_split), run=run, full_run="full" if run == "mue" else None,
          extra_args=generate_args(args, generate_extra))


def evaluate_forced_depth(args, ckpt: str, generate_extra: Sequence[str]) -> None:
    """MuE's final model cut to its first K layers (--exit-depth K, K < L) on the test split: records in
    OUT/forced_depth/records, shown in report.md's forced-depth section (K = L is the full model's record)."""
    import json

    from mue.evaluation.sweep import FULL, record_path, sweep

    with open(record_path(os.path.join(args.out, "runs"), TASKS[args.task], "full", args.test_split, FULL)) as f:
        layers = int(json.load(f)["exit"]["n_dec_layers"])  # the full model's record, written by its sweep
    depths = [1, layers - 1] if args.tiny else range(1, layers)
    sweep(task_data(args), TASKS[args.task], ckpt, os.path.join(args.out, "forced_depth", "records"), [FULL],
          (args.test_split,), run="mue", full_run=None, extra_args=generate_args(args, generate_extra),
          point_args=[("--exit-depth", str(k)) for k in depths])


def compare_first_stage(args, stage1_ckpt: str, generate_extra: Sequence[str]) -> None:
    """MuE's caption stage 1 vs its final stage on test, for the full model and at the thresholds chosen on
    dev (``STAGE_TARGET``): the stage-1 checkpoint is evaluated there (records in OUT/stages/records) and
    each pair compared by a paired bootstrap (OUT/stages/{task}_mue.json, a section of report.md)."""
    from mue.evaluation.records import NoSettingMeetsTarget, is_never_exit, load_records, select_for_target
    from mue.evaluation.stage_comparison import compare_stages, write_comparison
    from mue.evaluation.sweep import generate_record, record_path

    records = load_records(os.path.join(args.out, "runs"))
    dev = [r for r in records if r.get("split") == args.dev_split]
    test = [r for r in records if r.get("split") == args.test_split and r["task"] == args.task]
    finals = [("full model", next(r for r in test if r["run"] == "full" and is_never_exit(r)))]
    try:
        chosen = select_for_target(dev, test, args.task, STAGE_TARGET)
        finals.append((f"MuE, {100 * STAGE_TARGET:g} % of dev CIDEr", chosen["test_record"]))
    except NoSettingMeetsTarget as err:
        print(f"stage comparison: full model only ({err})")
    folder = os.path.join(args.out, "stages")
    pairs = []
    for label, final in finals:
        th = final["thresholds"]
        setting = (th["img_thres"], th["txt_thres"], th["dec_thres"])
        path = record_path(os.path.join(folder, "records"), TASKS[args.task], "mue stage1", args.test_split, setting)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        first = generate_record(task_data(args), TASKS[args.task], stage1_ckpt, args.test_split, setting, path,
                                "mue stage1", generate_args(args, generate_extra))
        pairs.append((label, first, final))
    comparison = compare_stages(pairs)
    write_comparison(os.path.join(folder, f"{TASKS[args.task]}_mue.json"), "mue", comparison)
    for row in comparison["rows"]:
        c = row["metrics"]["CIDEr"]
        print(f"   stage 2 - stage 1, {row['setting']}: CIDEr {c['a']:.1f} -> {c['b']:.1f}, "
              f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]")


def evaluate_baselines(args, ckpt: str, generate_extra: Sequence[str]) -> None:
    """The decoder-exit baselines that need no training (DeeBERT's entropy rule, PABEE's patience rule;
    mue.benchmarks.compare_baselines) on MuE's final model, each over its own knob, on the test split:
    records in OUT/baselines/records, the report's comparison section."""
    from mue.benchmarks.compare_baselines import exit_rule_points
    from mue.evaluation.sweep import sweep

    for run, points in exit_rule_points("tiny" if args.tiny else "short").items():
        sweep(task_data(args), TASKS[args.task], ckpt, baselines_path(args.out), [FULL], (args.test_split,),
              run=run, full_run=None, extra_args=generate_args(args, generate_extra), point_args=points)


def baselines_path(out: str) -> str:
    return os.path.join(out, "baselines", "records")


TIMED_TARGETS = (0.99, 0.96)  # the report's dev-chosen settings (render's targets), timed again


def time_chosen_settings(args, ckpt: str) -> None:
    """Time MuE's final model (``ckpt``) again at the full setting and at the thresholds chosen on dev for each of
    TIMED_TARGETS, in one process, --timed-repeats rounds (mue.benchmarks.timed_settings): the report's
    wall-clock speed-ups as medians with their spread (OUT/timing/{task}.json)."""
    from mue.benchmarks import timed_settings
    from mue.evaluation.records import NoSettingMeetsTarget, load_records, select_for_target
    from mue.exiting.config import THRESHOLD_KNOBS

    path = os.path.join(args.out, "timing", f"{TASKS[args.task]}.json")
    if os.path.exists(path):
        print(f"reusing {path}")
        return
    records = [r for r in load_records(os.path.join(args.out, "runs")) if r["task"] == args.task]
    dev = [r for r in records if r.get("split") == args.dev_split]
    test = [r for r in records if r.get("split") == args.test_split]
    settings, labels = [dict(zip(THRESHOLD_KNOBS, FULL))], ["full model"]
    for target in TIMED_TARGETS:
        try:
            th = select_for_target(dev, test, args.task, target)["test_record"]["thresholds"]
        except NoSettingMeetsTarget:
            continue
        setting = {k: th[k] for k in THRESHOLD_KNOBS}
        if setting not in settings:
            settings.append(setting)
            labels.append(f"MuE, chosen on dev for {100 * target:g} %")
    result = timed_settings.time_settings(
        ckpt, os.path.join(task_data(args), f"{args.test_split}.tsv"), settings, args.timed_repeats,
        args.timed_examples, args.eval_batch_size, CAPTION_KNOBS if args.task == "caption" else None,
        device="cuda" if args.ngpu else "cpu")
    timed_settings.write(result, path, labels)
    for label, row in zip(labels[1:], result["settings"][1:]):
        print(f"   timed again: {label}, {row['speedup']:.2f}x [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}]")


def control_path(out: str) -> str:
    return os.path.join(out, "controls", "snli_ve_wording_only.json")


def wording_only_control(args) -> None:
    """SNLI-VE: the wording-only control (mue.evaluation.wording_only), fitted on the training split and
    scored on the test split, unless done; report.md sets it beside the full model."""
    from mue.evaluation.wording_only import write_control

    path = control_path(args.out)
    if os.path.exists(path):
        print(f"reusing {path}")
        return
    data = task_data(args)
    result = write_control(os.path.join(data, "train.tsv"), os.path.join(data, f"{args.test_split}.tsv"), path)
    print(f"   wording-only control: {100 * result['accuracy']:.1f} % on {result['n_test']} {args.test_split} pairs")


def render(out: str, title: str, dev_split: str = "valid", test_split: str = "test") -> str:
    """Write OUT/report.md and OUT/paper_tables.md from every record in OUT/runs; return Table 1."""
    from mue.evaluation import paper_tables
    from mue.evaluation.records import load_records
    from mue.evaluation.report import render_report

    from mue.benchmarks import compare_baselines, timed_settings
    from mue.evaluation import forced_depth, stage_comparison, wording_only

    records = load_records(os.path.join(out, "runs"))
    test = [r for r in records if r.get("split") == test_split]
    dev = [r for r in records if r.get("split") == dev_split]
    sections = {**forced_depth.section(os.path.join(out, "forced_depth", "records"), test, test_split),
                **stage_comparison.section(os.path.join(out, "stages")),
                **wording_only.section(control_path(out), test),
                **compare_baselines.section(baselines_path(out), test, test_split),
                **timed_settings.section(os.path.join(out, "timing"))}
    render_report(test, out, title, dev_records=dev, targets=(0.99, 0.96), extra_sections=sections)
    return paper_tables.render_paper_tables(dev, test, out, title)


TASK_STAGES = 3  # data, training, evaluation (run_task); the report is the caller's


def run_task(args, extra: Sequence[str] = (), progress: Progress = None) -> None:
    """Data, training and evaluation for args.task (the report is rendered by the caller); each begins a
    stage of ``progress``."""
    progress = progress or Progress(TASK_STAGES)
    fairseq_task = TASKS[args.task]
    generate_extra = split_task_options(extra, task_option_names(fairseq_task))
    progress.begin(f"data ({args.task})")
    if args.synthetic:
        make_synthetic_data(args)
        if args.task == "snli_ve":
            print("note: in the demo's budget mue_ofa_micro learns only what the scenes' hypotheses' wording "
                  "tells (about 67 %, the wording-only control the report prints), with or without a caption "
                  "model to start from (--ofa-checkpoint) or the decoder prompt: its SNLI-VE answers do not "
                  "depend on the image")
    else:
        for split in ("train", args.dev_split, args.test_split):
            if not os.path.isfile(os.path.join(args.data, f"{split}.tsv")):
                raise SystemExit(f"{args.data}: no {split}.tsv (OFA's {args.task} TSV files are expected)")
        if not args.ofa_checkpoint:
            print("warning: no --ofa-checkpoint, the runs train from scratch (the paper fine-tunes OFA-base)")
        print(f"using {args.data}")
    progress.begin(f"training {args.task}: " + ", ".join(args.runs))
    ckpts = train_runs(args, extra)
    progress.begin(f"evaluating {args.task} over threshold sweeps ({args.dev_split}, {args.test_split})")
    for run, stages in ckpts.items():
        evaluate_run(args, run, stages[-1], generate_extra)
    if args.forced_depth:
        evaluate_forced_depth(args, ckpts["mue"][-1], generate_extra)
    if len(ckpts["mue"]) > 1:
        compare_first_stage(args, ckpts["mue"][0], generate_extra)
    if args.baselines:
        evaluate_baselines(args, ckpts["mue"][-1], generate_extra)
    if args.task == "snli_ve":
        wording_only_control(args)
    if args.timed_repeats:
        time_chosen_settings(args, ckpts["mue"][-1])


# ------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="OFA TSV folder of the task; --synthetic: the scenes' folder")
    p.add_argument("--out", required=True, help="checkpoints, records (runs/), report.md, paper_tables.md")
    p.add_argument("--ofa-checkpoint", help="converted OFA checkpoint to fine-tune from (real data); "
                   "--synthetic: a mue_ofa_micro checkpoint of the same scenes (the demo passes its caption "
                   "model to SNLI-VE)")
    p.add_argument("--ngpu", type=int, default=None, help="GPUs / training processes (default: all visible; 0: CPU)")
    p.add_argument("--synthetic", action="store_true", help="the built-in shape scenes, mue_ofa_micro, CPU")
    p.add_argument("--tiny", action="store_true", help="a minutes-long smoke run: 1 epoch, 2 sweep points")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="runs to train and sweep")
    p.add_argument("--parallel-runs", type=int, default=1,
                   help="CPU training (--ngpu 0): train this many runs side by side, each with an equal share of "
                        "the CPU threads (the demo: 2 caption runs on 2 cores, one thread each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="delete this task's earlier checkpoints and records")
    p.add_argument("--dev-split", default="valid", help="split that chooses thresholds (default valid)")
    p.add_argument("--test-split", default="test")
    p.add_argument("--epochs", type=int, help="training epochs (default: the recipe's: 5 real; synthetic 3)")
    p.add_argument("--scst-epochs", type=int, help="caption stage 2 (SCST) epochs (default 3 on real data; "
                   "--synthetic: 0, no stage 2); with two stages the report compares them on test")
    ce_weights = {kind: recipes.option_value(recipes.recipe("caption_stage2", kind == "synthetic").options,
                                             "--scst-ce-weight") for kind in ("real", "synthetic")}
    p.add_argument("--scst-ce-weight", type=float, help="layer-wise CE weight in stage 2 (default: the recipe's, "
                   f"{ce_weights['real']} real, {ce_weights['synthetic']} synthetic)")
    p.add_argument("--scst-lr", type=float, help="--synthetic stage 2 learning rate (default "
                   f"{recipes.recipe('caption_stage2', synthetic=True).lr:g})")
    p.add_argument("--batch-size", type=int, help="sentences per process and step (default 8 real, 32 synthetic)")
    p.add_argument("--effective-batch", type=int, help="real data: sentences per update over all processes "
                   "(default 64; --update-freq follows)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's, mue/recipes.py)")
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--forced-depth", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate MuE's model cut to K = 1..L-1 layers on test (the report's forced-depth table)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="run the decoder-exit baselines DeeBERT (entropy) and PABEE (patience) on MuE's model, on "
                        "test (the report's comparison section)")
    p.add_argument("--timed-repeats", type=int, default=3,
                   help="time MuE's model again at the full and the dev-chosen settings, this many rounds in one "
                        "process (the report's median speed-ups; 0: off)")
    p.add_argument("--timed-examples", type=int, default=None,
                   help="test examples those timings use (default: all)")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 4 real, 0 synthetic)")
    g = p.add_argument_group("synthetic data sizes")
    g.add_argument("--num-train", type=int, default=1000, help="training images")
    g.add_argument("--num-eval", type=int, default=100, help="images in each of valid and test")
    g.add_argument("--num-test", type=int, help="test images, if not --num-eval (a stage comparison needs ~1000)")
    g.add_argument("--image-size", type=int, default=64)
    return p


def parse_args(argv=None) -> Tuple[argparse.Namespace, List[str]]:
    """(options, pass-through fairseq-train options); checks the combinations."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [t for t in extra if t.startswith("-") and not t.startswith("--")]
    if stray:
        parser.error(f"unknown short option(s) {stray}; pass-through fairseq-train options use --long names")
    if args.synthetic:
        if args.ngpu:
            parser.error("--synthetic trains on the CPU in one process; leave out --ngpu")
        args.ngpu = 0
        if args.tiny:
            args.num_train, args.num_eval, args.num_test = 8, 4, None
    elif args.ngpu is None:
        import torch

        args.ngpu = torch.cuda.device_count()
    if "mue" not in args.runs:
        parser.error("--runs must include mue: its all-1.0 setting is the full model every table compares with")
    if args.ngpu < 0:
        parser.error(f"--ngpu must be >= 0, got {args.ngpu}")
    if args.parallel_runs < 1:
        parser.error(f"--parallel-runs must be >= 1, got {args.parallel_runs}")
    if args.parallel_runs > 1 and args.ngpu > 0:
        parser.error("--parallel-runs shares the CPU between trainings; with GPUs (--ngpu) the runs take turns")
    if args.timed_repeats < 0 or (args.timed_examples is not None and args.timed_examples < 1):
        parser.error(f"--timed-repeats must be >= 0 and --timed-examples >= 1, got {args.timed_repeats} and "
                     f"{args.timed_examples}")
    if args.ofa_checkpoint and not os.path.isfile(args.ofa_checkpoint):
        parser.error(f"--ofa-checkpoint {args.ofa_checkpoint}: file not found (convert an official one with "
                     f"python -m mue.checkpoints.convert_ofa OFA.pt OUT.pt)")
    if args.tiny:
        args.epochs = args.epochs or 1
        args.timed_repeats = min(args.timed_repeats, 2)
        if not args.synthetic:
            args.scst_epochs = 1 if args.scst_epochs is None else args.scst_epochs
    if args.num_workers is None:
        args.num_workers = 0 if args.synthetic else 4
    return args, extra


def clear_task_outputs(args) -> None:
    """--fresh: remove this task's checkpoints and records (other tasks' outputs stay)."""
    fairseq_task = TASKS[args.task]
    ckpt_root = os.path.join(args.out, "checkpoints")
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            if name.startswith(fairseq_task + "_"):
                shutil.rmtree(os.path.join(ckpt_root, name))
    timing = os.path.join(args.out, "timing", f"{fairseq_task}.json")
    if os.path.exists(timing):
        os.remove(timing)
    records = [os.path.join(args.out, "runs"), os.path.join(args.out, "forced_depth", "records"),
               os.path.join(args.out, "stages", "records"), os.path.join(args.out, "stages"), baselines_path(args.out)]
    for folder in records + [os.path.join(r, "generate") for r in records]:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(fairseq_task + "_"):
                    path = os.path.join(folder, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if args.task == "snli_ve" and os.path.exists(control_path(args.out)):
        os.remove(control_path(args.out))


def main(argv=None) -> str:
    args, extra = parse_args(argv)
    logging.getLogger().setLevel(logging.INFO)
    if args.fresh:
        clear_task_outputs(args)
    start = time.time()
    progress = Progress(TASK_STAGES + 1)
    run_task(args, extra, progress)
    progress.begin("report")
    what = "synthetic scenes, mue_ofa_micro" if args.synthetic else f"{args.data}"
    table1 = render(args.out, f"MuE reproduction: {args.task} ({what})", args.dev_split, args.test_split)
    print(table1)
    print(f"\ntables: {os.path.join(args.out, 'paper_tables.md')}, {os.path.join(args.out, 'report.md')}  "
          f"({time.time() - start:.0f} s)")
    return table1

