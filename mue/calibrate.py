"""Calibrate the exit thresholds to a risk level with a guarantee (Learn-then-Test).

    python -m mue.calibrate DATA --task mue_caption --path ckpt.pt --out results/calibration \\
        --epsilon 0.05 --delta 0.1 [--split valid] [--grid 0.99,0.99,0.99 0.95,0.95,0.95 ...] \\
        [--risk cider|differs] [--test-split test] [-- extra fairseq-generate args]
    python -m mue.calibrate --records results/demo/runs --task caption --split valid --epsilon 0.05 ...

With DATA, the full model and then the grid's settings are evaluated on the calibration split with
fairseq-generate (in this process, records reused), in the fixed testing order, stopping at the first
setting that fails: one full-model pass plus one pass per tested setting. With --records, existing
records (of `mue.evaluation.sweep` or the demo) are used instead. The answer: the cheapest setting whose
risk is <= epsilon with probability >= 1 - delta (the full model when none), the risks and p-values of
every setting tested, and the fairseq-generate options that use it (see mue.evaluation.calibration).
"""
import argparse
import json
import os
import sys
import time

from mue.evaluation import calibration as cal
from mue.evaluation.records import load_records
from mue.exiting.stats import reduction_text

TASKS = {"mue_caption": "caption", "mue_snli_ve": "snli_ve", "caption": "caption", "snli_ve": "snli_ve"}
#: a diagonal from nearly-full to aggressive, plus image-only and text-only exits
DEFAULT_GRID = ["0.995,0.995,0.995", "0.99,0.99,0.99", "0.98,0.98,0.98", "0.97,0.97,0.97", "0.95,0.95,0.95",
                "0.93,0.93,0.93", "0.9,0.9,0.9", "0.85,0.85,0.85", "0.8,0.8,0.8"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mue.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", help="data directory (runs fairseq-generate); or give --records")
    p.add_argument("--records", help="directory of existing result records to calibrate on instead")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--path", help="checkpoint (with DATA)")
    p.add_argument("--out", help="directory for the records and calibration.json (with DATA)")
    p.add_argument("--split", default="valid", help="calibration split (default valid)")
    p.add_argument("--test-split", help="also measure the chosen setting's risk on this split")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="candidate settings IMG,TXT,DEC (with DATA)")
    p.add_argument("--epsilon", type=float, default=0.05, help="risk level: share of inconsistent examples")
    p.add_argument("--delta", type=float, default=0.1, help="allowed probability that the guarantee fails")
    p.add_argument("--risk", choices=cal.RISKS, default=None,
                   help="per-example loss: differs (output not the full model's; SNLI-VE default) or cider "
                        "(caption CIDEr-D below --cider-fraction x the full model's; caption default)")
    p.add_argument("--cider-fraction", type=float, default=0.9)
    p.add_argument("--run", default="mue", help="run name of the candidate records (with --records)")
    return p


def _records_by_generation(args, task: str, split: str, settings, extra):
    """Records of the full model and of `settings` on `split`, each generated once (sweep's records)."""
    from mue.evaluation.sweep import FULL, generate_record, record_path

    out = os.path.join(args.out, "runs")
    os.makedirs(out, exist_ok=True)
    recs = []
    for s in [FULL, *settings]:
        name = "full" if s == FULL else args.run
        path = record_path(out, task, name, split, s)
        rec = generate_record(args.data, "mue_" + task, args.path, split, s, path, name, extra)
        rec["_source"] = path
        recs.append(rec)
    return recs


def calibrate_by_generation(args, task: str, extra) -> cal.Calibration:
    """Generate lazily: the full model, then each setting in the testing order until one fails."""
    from mue.evaluation.sweep import parse_setting

    order = cal.testing_order([parse_setting(g) for g in args.grid])
    (full,) = _records_by_generation(args, task, args.split, [], extra)
    etr = {}

    def losses_of(s):
        (_, rec) = _records_by_generation(args, task, args.split, [s], extra)
        etr[s] = rec["exit"].get("expected_time_reduction") or 0.0
        return cal.example_losses(task, full, rec, args.risk, args.cider_fraction), etr[s]

    tested = cal.fixed_sequence_test(order, losses_of, args.epsilon, args.delta)
    chosen, fell_back = cal.choose(tested)
    return cal.Calibration(task, args.risk, args.epsilon, args.delta, len(full["predictions"]), chosen, tested,
                           fell_back)


def describe(result: cal.Calibration, seconds: float) -> str:
    lines = [f"calibration of {result.task} on {result.n} examples: risk '{result.risk_name}' <= "
             f"{result.epsilon:g} with probability >= {1 - result.delta:g} ({seconds:.1f} s)",
             "  setting (img,txt,dec)   risk    p-value   passed   time reduction"]
    for t in result.tested:
        lines.append(f"  {','.join(f'{x:g}' for x in t.setting):22s} {t.risk:6.3f}  {t.p_value:9.3g}   "
                     f"{'yes' if t.passed else 'no ':6s}  {reduction_text(t.expected_time_reduction):>7s}")
    img, txt, dec = result.chosen
    if result.fell_back:
        lines.append("no setting passed: use the full model (thresholds 1)")
    else:
        c = result.chosen_test
        lines.append(f"chosen: {img:g},{txt:g},{dec:g} (calibration risk {c.risk:.3f}, p-value {c.p_value:.3g}, "
                     f"time reduction {reduction_text(c.expected_time_reduction)})")
    lines.append(f"use it: fairseq-generate ... --img-thres {img:g} --txt-thres {txt:g} --dec-thres {dec:g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.risk = args.risk or ("cider" if task == "caption" else "differs")
    if (args.data is None) == (args.records is None):
        parser.error("give either DATA (with --path and --out) or --records")
    if args.data is not None and not (args.path and args.out):
        parser.error("DATA needs --path (checkpoint) and --out (directory for the records)")
    if not 0 < args.epsilon < 1 or not 0 < args.delta < 1:
        parser.error(f"--epsilon and --delta must lie in (0, 1), got {args.epsilon} and {args.delta}")
    start = time.perf_counter()
    try:
        if args.records:
            records = [r for r in load_records(args.records) if r.get("split") == args.split]
            result = cal.calibrate_records(records, task, args.epsilon, args.delta, args.risk, args.cider_fraction,
                                           args.run)
        else:
            result = calibrate_by_generation(args, task, extra)
    except ValueError as err:
        parser.error(str(err))
    print(describe(result, time.perf_counter() - start))
    summary = result.as_record() | {"split": args.split, "seconds": time.perf_counter() - start}
    if args.test_split:
        if args.records:
            test = [r for r in load_records(args.records) if r.get("split") == args.test_split]
        else:
            test = _records_by_generation(args, task, args.test_split, [] if result.fell_back else [result.chosen],
                                          extra)
        measured = cal.risk_on(test, task, result.chosen, args.risk, args.cider_fraction, args.run)
        summary["test_split"], summary["test_risk"] = args.test_split, measured
        print(f"on {args.test_split}: risk {measured:.3f} (epsilon {args.epsilon:g})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"calibration_{task}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
