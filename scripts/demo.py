#!/usr/bin/env python
"""The main job: MuE on the built-in synthetic scenes, end to end, on a CPU.

  1. data      python -m mue.data.synthetic (seeded scenes; captions and SNLI-VE in OFA's TSV formats)
  2. train     fairseq-train --arch mue_ofa_micro for both tasks: MuE (criterion `mue`, layer-wise loss)
               and the ablation w/o layer-wise loss (`--last-layer-only`)
  3. evaluate  fairseq-generate over a threshold sweep, on the dev split (to choose thresholds) and the
               test split; every run writes one JSON record with quality, exit statistics and timing
  4. report    markdown tables and PNG plots in results/demo/, headline table printed at the end

Each stage is skipped when its output already exists (a second run reuses them); `--fresh` redoes all.
Deterministic given --seed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Threshold sweeps (image, text, decoder). The first entry (1.0 everywhere) is the full model; the
# ablation runs use every other entry.
SWEEP = [(1.0, 1.0, 1.0), (0.995, 0.995, 0.995), (0.99, 0.99, 0.99), (0.98, 0.98, 0.98), (0.95, 0.95, 0.95),
         (0.9, 0.9, 0.9)]
TINY_SWEEP = [(1.0, 1.0, 1.0), (0.9, 0.9, 0.9)]


def stage(title):
    print(f"\n==> {title}", flush=True)


def run(cmd, log_path=None):
    """Run a command, streaming its output (fairseq's progress) and keeping a log."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path or os.devnull, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            if any(key in line for key in ("| INFO | train |", "| INFO | valid |", "done training", "Error", "error")):
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"command failed ({proc.returncode}); see {log_path}")


def make_data(args):
    stage("1/4 synthetic scenes")
    marker = os.path.join(args.data, "meta.json")
    if os.path.exists(marker):
        print(f"reusing {args.data}")
        return
    run([sys.executable, "-m", "mue.data.synthetic", "--out", args.data, "--seed", str(args.seed),
         "--num-train", str(args.num_train), "--num-valid", str(args.num_eval), "--num-test", str(args.num_eval),
         "--image-size", str(args.image_size)])


def train(args, task, name, extra):
    save_dir = os.path.join(args.out, "checkpoints", f"{task}_{name}")
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    done = os.path.join(save_dir, "done")
    if os.path.exists(done):
        print(f"reusing {ckpt}")
        return ckpt
    os.makedirs(save_dir, exist_ok=True)
    data = os.path.join(args.data, "caption" if task == "mue_caption" else "snli_ve")
    epochs = args.caption_epochs if task == "mue_caption" else args.snli_epochs
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "fairseq-train"), data, "--user-dir", os.path.join(ROOT, "mue"),
        "--task", task, "--arch", "mue_ofa_micro", "--criterion", "mue", "--patch-image-size", str(args.image_size),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--lr", str(args.lr), "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", "50", "--total-num-update", "100000", "--clip-norm", "1.0", "--weight-decay", "0.01",
        "--dropout", "0.1", "--max-epoch", str(epochs), "--batch-size", str(args.batch_size),
        "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--disable-validation", "--cpu", "--seed", str(args.seed), "--num-workers", "0", "--log-format", "simple",
        "--log-interval", "50", "--required-batch-size-multiple", "1",
    ] + extra
    start = time.time()
    run(cmd, os.path.join(save_dir, "train.log"))
    with open(done, "w") as f:
        f.write(f"{time.time() - start:.1f}\n")
    return ckpt


def evaluate(args, task, ckpt, run_name, settings):
    from mue.evaluation.sweep import sweep

    data = os.path.join(args.data, "caption" if task == "mue_caption" else "snli_ve")
    extra = ["--patch-image-size", str(args.image_size), "--batch-size", str(args.eval_batch_size), "--cpu",
             "--num-workers", "0", "--quiet"]
    if task == "mue_caption":
        extra += ["--beam", "5", "--max-len-b", "16", "--no-repeat-ngram-size", "3", "--eval-metrics", "bleu,rouge,cider",
                  "--dec-schedule", "decay", "--dec-decay-beta", "0.95", "--dec-decay-tau", "1.0"]
    sweep(data, task, ckpt, os.path.join(args.out, "runs"), settings, ("valid", "test"), run=run_name,
          full_run="full" if run_name == "mue" else None, extra_args=extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "demo"))
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=1000, help="training images")
    parser.add_argument("--num-eval", type=int, default=100, help="images in each of valid and test")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--caption-epochs", type=int, default=4)
    parser.add_argument("--snli-epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fresh", action="store_true", help="delete earlier outputs and redo every stage")
    parser.add_argument("--tiny", action="store_true", help="a minutes-long smoke run (tests use it)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_train, args.num_eval, args.caption_epochs, args.snli_epochs = 8, 4, 1, 1
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.rmtree(args.data, ignore_errors=True)
    start = time.time()
    make_data(args)

    stage("2/4 training mue_ofa_micro (fairseq-train --criterion mue)")
    runs = {}
    for task, extra in (("mue_caption", ["--label-smoothing", "0.1"]), ("mue_snli_ve", [])):
        runs[(task, "mue")] = train(args, task, "mue", extra)
        runs[(task, "w/o layer-wise loss")] = train(args, task, "lastlayer", extra + ["--last-layer-only"])

    stage("3/4 evaluating over a threshold sweep (fairseq-generate)")
    settings = TINY_SWEEP if args.tiny else SWEEP
    for (task, run_name), ckpt in runs.items():
        evaluate(args, task, ckpt, run_name, settings if run_name == "mue" else settings[::2])

    stage("4/4 report")
    from mue.evaluation.report import load_records, render_report

    records = load_records(os.path.join(args.out, "runs"))
    test = [r for r in records if r["split"] == "test"]
    dev = [r for r in records if r["split"] == "valid"]
    headline = render_report(test, args.out, "MuE on synthetic scenes (mue_ofa_micro, CPU)", dev_records=dev,
                             targets=(0.99, 0.96))
    print(headline)
    print(f"\nfull report: {os.path.join(args.out, 'report.md')}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
