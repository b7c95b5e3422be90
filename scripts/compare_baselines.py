"""MuE against other exit methods and a smaller model, in one harness, on the synthetic caption benchmark.

    python scripts/compare_baselines.py OUT --train [--tiny]          # train the models, then compare
    python scripts/compare_baselines.py OUT --checkpoints CKPT_DIR    # compare trained ones

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
(in this process). Records go to OUT/records (an existing record is reused), the report (tables, plots)
to OUT/report, and the comparison table below is printed and written to OUT/report/comparison.md: per
method and quality level, the largest expected time reduction (Eq. 14) and FLOPs reduction among its
settings that keep that share of the full model's CIDEr, and whether MuE is ahead of it there.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TASK = "mue_caption"
MUE, FULL = "mue", "full"
LEVELS = (0.99, 0.96, 0.9)


def plan(tiny: bool) -> Dict[str, dict]:
    """Run name -> checkpoint, threshold settings and per-point args (each method's own knob)."""
    if tiny:
        mue_settings, dec_only = [(1.0, 1.0, 1.0), (0.9, 0.9, 0.9)], []
        entropies, patiences = [1.0, 4.0], [1, 2]
    else:
        mue_settings = [(1.0, 1.0, 1.0), (0.995, 0.995, 0.99), (0.99, 0.99, 0.98), (0.98, 0.98, 0.95),
                        (0.95, 0.95, 0.9), (0.9, 0.9, 0.85), (0.8, 0.8, 0.75)]
        dec_only = [(1.0, 1.0, t) for t in (0.99, 0.98, 0.95, 0.9, 0.85, 0.75)]
        entropies, patiences = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], [4, 3, 2, 1]
    runs = {
        MUE: {"checkpoint": "mue", "settings": mue_settings, "points": [[]]},
        "entropy (DeeBERT)": {"checkpoint": "mue", "settings": [(1.0, 1.0, 1.0)],
                              "points": [["--exit-policy", "entropy", "--exit-entropy", f"{s:g}"] for s in entropies]},
        "patience (PABEE)": {"checkpoint": "mue", "settings": [(1.0, 1.0, 1.0)],
                             "points": [["--exit-policy", "patience", "--exit-patience", str(p)] for p in patiences]},
        "imitation (DeeCap)": {"checkpoint": "imitation", "settings": [(1.0, 1.0, 1.0)],
                               "points": [["--exit-policy", "imitation", "--exit-entropy", f"{s:g}"]
                                          for s in entropies]},
        "OFA-Tiny": {"checkpoint": "ofa_tiny", "settings": [(1.0, 1.0, 1.0)],
                     "points": [["--reference-arch", "mue_ofa_micro"]]},
    }
    if dec_only:
        runs["mue (decoder only)"] = {"checkpoint": "mue", "settings": dec_only, "points": [[]]}
    return runs


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"train": 8, "valid": 4, "test": 4, "image": 32, "updates": 2, "imitation_updates": 3, "batch": 4}
    return {"train": 512, "valid": 64, "test": 64, "image": 64, "updates": 1500, "imitation_updates": 300,
            "batch": 16}


def model_args(size: dict) -> List[str]:
    """Task arguments training and generation must share (they fix the vocabulary and image size)."""
    return ["--num-codes", "0", "--num-bins", "0", "--patch-image-size", str(size["image"]), "--cpu",
            "--num-workers", "0"]


def fairseq_train(argv: Sequence[str]) -> None:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    train.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), list(argv))))


def train_models(data: str, ckpt_dir: str, size: dict, log=print) -> None:
    """The MuE backbone, its imitation heads (backbone frozen) and the OFA-Tiny baseline, via fairseq-train."""
    common = [data, "--user-dir", os.path.join(REPO, "mue"), "--task", TASK, *model_args(size),
              "--batch-size", str(size["batch"]), "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler",
              "inverse_sqrt", "--warmup-updates", str(max(1, size["updates"] // 10)), "--dropout", "0.1",
              "--no-epoch-checkpoints", "--disable-validation", "--log-format", "simple", "--log-interval", "50",
              "--seed", "1", "--max-epoch", "1000"]
    jobs = [
        ("mue", ["--arch", "mue_ofa_micro", "--criterion", "mue", "--label-smoothing", "0.1",
                 "--max-update", str(size["updates"])]),
        ("imitation", ["--arch", "mue_ofa_micro", "--criterion", "mue_imitation", "--exit-policy", "imitation",
                       "--max-update", str(size["imitation_updates"]),
                       "--restore-file", os.path.join(ckpt_dir, "mue", "checkpoint_last.pt"), "--reset-optimizer",
                       "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]),
        ("ofa_tiny", ["--arch", "mue_ofa_nano", "--encoder-mode", "joint", "--criterion", "mue",
                      "--last-layer-only", "--label-smoothing", "0.1", "--max-update", str(size["updates"])]),
    ]
    for name, args in jobs:
        save = os.path.join(ckpt_dir, name)
        if os.path.exists(os.path.join(save, "checkpoint_last.pt")):
            log(f"-- {name}: reusing {save}/checkpoint_last.pt")
            continue
        log(f"-- training {name} ({' '.join(args)})")
        fairseq_train([*common, *args, "--save-dir", save])


def run_sweeps(data: str, ckpt_dir: str, out: str, size: dict, tiny: bool, split: str, log=print) -> List[str]:
    from mue.evaluation.sweep import sweep

    gen = [*model_args(size), "--batch-size", "16", "--beam", "3", "--max-len-b", "16",
           "--eval-metrics", "bleu,cider"]
    paths = []
    for run, spec in plan(tiny).items():
        ckpt = os.path.join(ckpt_dir, spec["checkpoint"], "checkpoint_last.pt")
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{ckpt}: checkpoint of run {run!r} not found (train with --train)")
        log(f"-- {run}")
        paths += sweep(data, TASK, ckpt, out, spec["settings"], [split], run=run,
                       full_run=FULL if run == MUE else "", extra_args=gen, point_args=spec["points"], log=log)
    return paths


def _best_at(rows: Sequence[dict], run: str, level: float, q_full: float):
    """(time reduction, FLOPs reduction, thresholds) of `run`'s largest Eq. 14 saving whose quality is
    >= level x the full model's `q_full`."""
    from mue.evaluation.report import format_thresholds

    ok = [r for r in rows if r["record"]["run"] == run and r["quality"] >= level * q_full - 1e-12]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["etr"], r["quality"]))
    return best["etr"], best["flops_reduction"], format_thresholds(best["record"]["thresholds"])


def comparison_table(records: Sequence[dict], task: str = "caption", levels: Sequence[float] = LEVELS) -> str:
    """Markdown: per method and level, its best saving that keeps the level, and whether MuE is ahead."""
    from mue.evaluation.report import find_baseline, quality_key, tradeoff_rows

    rows = tradeoff_rows(records, task)
    q_full = float(find_baseline(records, task)["metrics"][quality_key(task)])
    runs = [r for r in dict.fromkeys(row["record"]["run"] for row in rows) if r != FULL]
    runs.sort(key=lambda name: name != MUE)
    head = ["method", "kept CIDEr", "time red. (%)", "FLOPs red. (%)", "setting", "vs MuE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for level in levels:
            mine, ref = _best_at(rows, run, level, q_full), _best_at(rows, MUE, level, q_full)
            if mine is None:
                cells = ["none reaches it", "n/a", "-", "MuE ahead" if ref and run != MUE else "n/a"]
            else:
                etr, flops, setting = mine
                if run == MUE:
                    verdict = "-"
                elif ref is None:
                    verdict = "baseline ahead (MuE reaches no setting here)"
                elif abs(ref[0] - etr) < 1e-9:
                    verdict = "tie"
                else:
                    verdict = "MuE ahead" if ref[0] > etr else "baseline ahead"
                cells = [f"{100 * etr:.1f}", "n/a" if flops is None else f"{100 * flops:.1f}", setting, verdict]
            lines.append("| " + " | ".join([run, f">= {100 * level:g}%"] + cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (data, checkpoints, records, report)")
    parser.add_argument("--checkpoints", help="directory with mue/, imitation/, ofa_tiny/ checkpoint_last.pt")
    parser.add_argument("--train", action="store_true", help="train the three models first (into OUT/checkpoints)")
    parser.add_argument("--data", help="synthetic benchmark directory (default: written to OUT/data)")
    parser.add_argument("--split", default="valid", help="split to evaluate (default valid)")
    parser.add_argument("--tiny", action="store_true", help="tiny data, few updates, two points per method (tests)")
    args = parser.parse_args(argv)
    if not args.train and not args.checkpoints:
        parser.error("give --checkpoints DIR (trained models) or --train")
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's INFO logs drown the comparison
    import mue  # noqa: F401  (registers the plugin)
    from mue.data.synthetic import generate
    from mue.evaluation.report import load_records, render_report

    size = sizes(args.tiny)
    data_root = args.data or os.path.join(args.out, "data")
    if not os.path.isfile(os.path.join(data_root, "dict.txt")):
        generate(data_root, num_train=size["train"], num_valid=size["valid"], num_test=size["test"],
                 image_size=size["image"])
    data = os.path.join(data_root, "caption")
    ckpt_dir = args.checkpoints or os.path.join(args.out, "checkpoints")
    if args.train:
        train_models(data, ckpt_dir, size)
    records_dir = os.path.join(args.out, "records")
    paths = run_sweeps(data, ckpt_dir, records_dir, size, args.tiny, args.split)
    records = load_records(paths)
    report_dir = os.path.join(args.out, "report")
    headline = render_report(records, report_dir, title="MuE vs exit baselines and OFA-Tiny (synthetic captions)")
    table = comparison_table(records)
    with open(os.path.join(report_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(headline)
    print("\n## Best saving per method at each kept share of the full model's CIDEr\n")
    print(table)
    print(f"\nreport written to {report_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
