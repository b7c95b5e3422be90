"""The evaluation report: every table and plot of a set of result records, in one markdown file.

    python -m mue.evaluation.report RESULTS_DIR_OR_FILES... --out DIR [--target 0.99 --dev-dir DIR]

writes DIR/report.md (per task and split: the trade-off table, the curves, where the full model's FLOPs
go, image vs text depth, the
runs' ablation table and, with --dev-dir, the thresholds chosen on dev for each --target) and the PNGs.
The parts live in their own modules: ``records`` (the record format, the full model, selection),
``tables`` (markdown) and ``plots`` (curves).
"""
import argparse
import logging
import os
import re
import sys
from typing import Dict, Optional, Sequence

from .calibration import calibration_table
from .plots import X_AXES, plot_tradeoff
from .records import format_thresholds, is_never_exit, load_records, validate_record
from .tables import ablation_table, decomposition_table, flops_breakdown_table, target_table, tradeoff_table

# format_thresholds and is_never_exit are re-exported: tests/test_baselines.py imports them from here
__all__ = ["render_report", "main", "format_thresholds", "is_never_exit"]


def _slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _calibration(dev_records, records, task, target, baseline_run) -> str:
    """The Learn-then-Test section (mue.evaluation.calibration), or why it could not be made."""
    try:
        return calibration_table(dev_records, records, task, target=target, baseline_run=baseline_run)
    except (KeyError, ValueError) as err:  # e.g. records without per-example predictions
        return f"Not calibrated: {err}"


def _flops_breakdown(records, task, baseline_run) -> str:
    try:
        return flops_breakdown_table(records, task, baseline_run)
    except ValueError as err:  # no full-model record among these
        return f"No FLOP breakdown: {err}"


def render_report(records: Sequence[dict], out_dir: str, title: str = "MuE evaluation report",
                  dev_records: Optional[Sequence[dict]] = None, targets: Sequence[float] = (0.99,),
                  baseline_run: str = "full", quality: Optional[str] = None,
                  extra_sections: Optional[Dict[str, str]] = None) -> str:
    """Write ``out_dir/report.md`` (all tables, per task and split) and the PNG plots; return the
    headline markdown (the trade-off tables).  With ``dev_records``, add the target-selection
    table (thresholds chosen on dev, reported on ``records``); ``extra_sections`` ({title: markdown})
    are appended as they are (e.g. ``stage_comparison.section``)."""
    if not records:
        raise ValueError("render_report: no result records")
    for i, rec in enumerate(records):
        validate_record(rec, rec.get("_source", f"records[{i}]") if isinstance(rec, dict) else f"records[{i}]")
    os.makedirs(out_dir, exist_ok=True)
    groups = list(dict.fromkeys((r["task"], r.get("split")) for r in records))
    headline, body = [], [f"# {title}"]
    for task, split in groups:
        recs = [r for r in records if r["task"] == task and r.get("split") == split]
        heading = f"## {task} ({split if split is not None else 'split not given'})"
        trade = tradeoff_table(recs, task, baseline_run, quality)
        headline.append(f"{heading}\n\n{trade}")
        body += [heading, "### Quality vs cost", trade]
        for x in X_AXES:
            png = f"{_slug(task)}_{_slug(str(split))}_{x}.png"
            try:
                plot_tradeoff(recs, task, os.path.join(out_dir, png), x, baseline_run, quality)
            except ValueError as e:
                if x != "speedup":
                    raise
                body.append(f"Speedup plot not drawn: {e}")
                continue
            body.append(f"![{task} {x}]({png})")
        body += ["### Where the full model's FLOPs go", _flops_breakdown(recs, task, baseline_run),
                 "### Image depth vs text depth", decomposition_table(recs, task, baseline_run, quality),
                 "### Runs (ablations)", ablation_table(recs, task, baseline_run=baseline_run, quality=quality)]
        if dev_records and any(r.get("task") == task for r in dev_records):
            body += [f"### Thresholds chosen on dev, reported on {split}",
                     target_table(dev_records, recs, task, targets, baseline_run=baseline_run, quality=quality),
                     f"### Thresholds with a guarantee (calibrated on dev, reported on {split})",
                     _calibration(dev_records, recs, task, targets[0], baseline_run)]
    for title, text in (extra_sections or {}).items():
        body += [f"## {title}", text]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(body) + "\n")
    return "\n\n".join(headline)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mue.evaluation.report",
        description="Trade-off tables and plots from MuE evaluation result records (JSON).")
    parser.add_argument("results", nargs="+", help="result JSON files or directories of them")
    parser.add_argument("--out", required=True, help="directory for report.md and the PNG plots")
    parser.add_argument("--title", default="MuE evaluation report")
    parser.add_argument("--dev-dir", nargs="+", default=None,
                        help="dev-split result files/directories: choose thresholds there for --target")
    parser.add_argument("--target", type=float, nargs="+", default=[0.99],
                        help="share(s) of the full model's dev quality to keep (default 0.99)")
    parser.add_argument("--baseline-run", default="full", help="run name of the full model (default full)")
    parser.add_argument("--quality-key", default=None, help="metric to use instead of CIDEr / accuracy")
    args = parser.parse_args(argv)
    # importing fairseq (via mue) sets the root logger to DEBUG (its wav2vec2_classification module
    # calls basicConfig(level=DEBUG)), which floods the output with matplotlib's font search
    logging.getLogger().setLevel(logging.INFO)
    records = load_records(args.results)
    dev = load_records(args.dev_dir) if args.dev_dir else None
    print(render_report(records, args.out, args.title, dev, args.target, args.baseline_run, args.quality_key))
    print(f"\nreport written to {os.path.join(args.out, 'report.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
