"""Threshold sweeps: one `fairseq-generate` run per exit setting, each writing one result record.

    python -m mue.evaluation.sweep DATA_DIR --task mue_caption --path ckpt.pt --out results/sweep \\
        --splits valid,test --thresholds 1,1,1 0.99,0.99,0.95 0.95,0.9,0.9 [-- extra fairseq-generate args]

Each setting is "IMG,TXT,DEC"; records land in OUT as {task}_{run}_{split}_{IMG}_{TXT}_{DEC}.json and
are read by `python -m mue.evaluation.report`. Arguments after `--` go to every run (e.g. `--dec-schedule
decay`, `--kv-policy drop`, `--model-overrides "{'encoder_mode': 'joint'}"`); `--point-args` adds a
per-run knob: each string (e.g. "--exit-policy entropy --exit-entropy 0.5") is crossed with every
setting and tagged into the record's file name, so baselines sweep their own knob (`--exit-entropy`,
`--exit-patience`). Only the all-1.0 setting without point args is stored as the full model. Runs happen in this process through fairseq-generate's
own entry point (fairseq_cli.generate.main), which saves the interpreter start per setting; a record
that already exists is reused.
"""
import argparse
import json
import os
import re
import shlex
import sys
from typing import Dict, List, Sequence, Tuple

from mue.exiting.config import NEVER_EXIT, validate_threshold
from mue.exiting.stats import reduction_text

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the setting stored as the full model: no stream ever exits
FULL = (NEVER_EXIT,) * 3


def parse_setting(text: str) -> Tuple[float, float, float]:
    """"0.99,0.7,0.9" -> (image, text, decoder) thresholds."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"a threshold setting is IMG,TXT,DEC (three numbers), got {text!r}")
    return tuple(validate_threshold(p, name) for p, name in zip(parts, ("image", "text", "decoder")))


def record_path(out_dir: str, task: str, run: str, split: str, setting: Sequence[float],
                point_args: Sequence[str] = ()) -> str:
    safe_run = re.sub(r"[^A-Za-z0-9]+", "-", run).strip("-")
    tag = "_".join(f"{t:g}" for t in setting)
    if point_args:
        tag += "_" + re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(point_args)).strip("-")
    return os.path.join(out_dir, f"{task}_{safe_run}_{split}_{tag}.json")


def generate_record(data: str, task: str, checkpoint: str, split: str, setting: Sequence[float], out_json: str,
                    run: str = "mue", extra_args: Sequence[str] = ()) -> Dict:
    """Run fairseq-generate once at `setting` (image, text, decoder thresholds); return its record."""
    if not os.path.exists(out_json):
        from fairseq import options
        from fairseq_cli import generate

        img, txt, dec = setting
        argv = [
            data, "--user-dir", PLUGIN_DIR, "--task", task, "--path", checkpoint, "--gen-subset", split,
            "--required-batch-size-multiple", "1", "--img-thres", str(img), "--txt-thres", str(txt),
            "--dec-thres", str(dec), "--eval-results", out_json, "--eval-run-name", run,
            "--results-path", os.path.join(os.path.dirname(out_json), "generate", os.path.basename(out_json)[:-5]),
            *extra_args,
        ]
        generate.main(options.parse_args_and_arch(options.get_generation_parser(), argv))
        if not os.path.exists(out_json):
            raise RuntimeError(f"fairseq-generate did not score the whole {split} split of {data}; no record written")
    with open(out_json) as f:
        return json.load(f)


def sweep(data: str, task: str, checkpoint: str, out_dir: str, settings: Sequence[Sequence[float]],
          splits: Sequence[str] = ("valid", "test"), run: str = "mue", full_run: str = "full",
          extra_args: Sequence[str] = (), log=print, point_args: Sequence[Sequence[str]] = ((),)) -> List[str]:
    """Evaluate every setting x every `point_args` entry on every split; the all-1.0 setting without point
    args is stored as run `full_run`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split in splits:
        for setting in settings:
            for point in point_args:
                point = list(point)
                name = full_run if tuple(setting) == FULL and not point and full_run else run
                path = record_path(out_dir, task, name, split, setting, point)
                rec = generate_record(data, task, checkpoint, split, setting, path, name, [*extra_args, *point])
                log(f"   {split:5s} {name:22s} {','.join(f'{t:g}' for t in setting):16s} {' '.join(point):28s} "
                    f"{summary_line(rec)}")
                paths.append(path)
    return paths


def summary_line(rec: Dict) -> str:
    quality = ", ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items() if k in ("CIDEr", "Bleu_4", "accuracy"))
    ex = rec.get("exit") or {}
    return (f"{quality}; time reduction {reduction_text(ex.get('expected_time_reduction'))}; "
            f"{ex.get('wall_clock_s', 0):.1f} s")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--task", required=True, choices=("mue_caption", "mue_snli_ve"))
    parser.add_argument("--path", required=True, help="checkpoint")
    parser.add_argument("--out", required=True, help="directory for the result records")
    parser.add_argument("--splits", default="valid,test")
    parser.add_argument("--run", default="mue", help="run name for the curves (e.g. 'w/o layer-wise loss')")
    parser.add_argument("--thresholds", nargs="+", required=True, help="settings IMG,TXT,DEC")
    parser.add_argument("--point-args", nargs="+", default=None,
                        help='per-run fairseq-generate args crossed with the settings, each one string, e.g. '
                             '"--exit-policy entropy --exit-entropy 0.5"')
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(t) for t in args.thresholds]
    except ValueError as err:
        parser.error(str(err))
    points = [shlex.split(p) for p in args.point_args] if args.point_args else [()]
    sweep(args.data, args.task, args.path, args.out, settings, args.splits.split(","), args.run, extra_args=extra,
          point_args=points)


if __name__ == "__main__":
    main()
