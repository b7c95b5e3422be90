"""The paper's Tables 1-4 and its quality vs time-reduction figure, with the paper's numbers beside ours.

Built from the same result records as ``mue.evaluation.report`` (one per run, split and threshold setting)
and from the same parts (``records``: baseline, dev-side threshold selection; ``tables``: depth and ablation
tables; ``plots``); this module only arranges them in the paper's layout:

  Table 1  full model vs MuE (thresholds chosen on dev to keep ``target`` of the full model's quality),
           test quality and expected time reduction (Eq. 14)
  Table 2  image vs text encoder depth (``tables.decomposition_table`` over the full model and MuE)
  Table 3  the trade-off at several time-reduction rates: per rate, the best dev setting of MuE that
           saves at least that much, reported on test
  Table 4  ablations: MuE, w/o decomposition, w/o layer-wise loss, each at its dev-chosen setting
           (plus ``tables.ablation_table``)
  Figure   quality vs expected time reduction, every run (``plots.plot_tradeoff``)

Scores are shown x100 (accuracy %, BLEU/METEOR/CIDEr/SPICE as papers print them). The paper's numbers
(OFA-base) are listed in docs/OFA.md, "The paper's reported numbers"; cells without a reported number
show "-".

    python -m mue.evaluation.paper_tables RUNS_DIR --out DIR [--dev-split valid] [--test-split test]
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from .plots import plot_tradeoff
from .records import (NoSettingMeetsTarget, find_baseline, format_thresholds, load_records, quality_key,
                      same_thresholds, select_for_target, tradeoff_rows)
from .tables import ablation_table, decomposition_table, markdown, pct

__all__ = ["PAPER", "TABLE1_METRICS", "RUN_ORDER", "select_for_reduction", "table1", "table2", "table3",
           "table4", "render_paper_tables", "main"]

# The paper's results (OFA-base; docs/OFA.md, "The paper's reported numbers"). Scores x100, time
# reduction in %.
PAPER: Dict[str, Dict[str, Dict[str, float]]] = {
    "snli_ve": {"full": {"accuracy": 89.2, "time_reduction": 0.0},
                "mue": {"accuracy": 88.5, "time_reduction": 50.0}},
    "caption": {"full": {"CIDEr": 146.7, "time_reduction": 0.0},
                "mue": {"Bleu_4": 41.6, "METEOR": 30.6, "CIDEr": 137.0, "SPICE": 24.4, "time_reduction": 40.2}},
}
# Table 1's columns per task: (header, metric key of the records)
TABLE1_METRICS = {"snli_ve": [("Acc.", "accuracy")],
                  "caption": [("BLEU-4", "Bleu_4"), ("METEOR", "METEOR"), ("CIDEr", "CIDEr"), ("SPICE", "SPICE")]}
RUN_ORDER = ("mue", "w/o decomposition", "w/o layer-wise loss")
TASK_TITLES = {"snli_ve": "SNLI-VE", "caption": "COCO captioning"}
DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)


def _paper(task: str, row: str, key: str) -> str:
    value = PAPER.get(task, {}).get(row, {}).get(key)
    return "-" if value is None else f"{value:.1f}"


def _score(record: Optional[dict], key: str) -> str:
    value = None if record is None else record["metrics"].get(key)
    return pct(value)


def _tasks(records: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(r["task"] for r in records))


# ------------------------------------------------------------------------------------------ Table 1
def table1(dev: Sequence[dict], test: Sequence[dict], task: str, target: float = 0.99) -> str:
    """Full model vs MuE on test: each metric and the time reduction, ours / paper."""
    full = find_baseline(test, task)
    try:
        chosen = select_for_target(dev, test, task, target)
        mue, note = chosen["test_record"], format_thresholds(chosen["thresholds"])
    except NoSettingMeetsTarget:
        mue, note = None, f"no dev setting keeps {100 * target:g}% of the full model's quality"
    headers = ["model"] + [f"{name} ours / paper" for name, _ in TABLE1_METRICS[task]]
    headers += ["time red. (%) ours / paper", "thresholds (chosen on dev)"]
    rows = []
    for label, row, rec, thresholds in (("OFA (full model)", "full", full, "all 1 (never exit)"),
                                        ("MuE", "mue", mue, note)):
        cells = [label] + [f"{_score(rec, key)} / {_paper(task, row, key)}" for _, key in TABLE1_METRICS[task]]
        etr = None if rec is None else rec["exit"]["expected_time_reduction"]
        cells += [f"{pct(etr)} / {_paper(task, row, 'time_reduction')}", thresholds.replace("|", "/")]
        rows.append(cells)
    return markdown(headers, rows)


# ------------------------------------------------------------------------------------------ Table 2
def table2(test: Sequence[dict], task: str) -> str:
    """Image vs text encoder depth of the full model and MuE (decomposed encoder) on test."""
    recs = [r for r in test if r["task"] == task and r["run"] in ("full", "mue")]
    return decomposition_table(recs, task)


# ------------------------------------------------------------------------------------------ Table 3
def select_for_reduction(dev: Sequence[dict], test: Sequence[dict], task: str, rate: float,
                         run: str = "mue") -> Optional[dict]:
    """On dev, the best-quality setting of ``run`` whose expected time reduction is >= ``rate`` (ties: the
    larger reduction); its test row (``records.tradeoff_rows``) under ``"test"`` and the dev row under
    ``"dev"``. None when no dev setting saves that much; an error when the test split lacks the setting."""
    dev_rows = [r for r in tradeoff_rows(dev, task) if r["record"]["run"] == run and r["etr"] >= rate - 1e-12]
    if not dev_rows:
        return None
    best = max(dev_rows, key=lambda r: (r["quality"], r["etr"]))
    th = best["record"]["thresholds"]
    matches = [r for r in tradeoff_rows(test, task)
               if r["record"]["run"] == run and same_thresholds(r["record"]["thresholds"], th)]
    if len(matches) != 1:
        raise ValueError(f"select_for_reduction: {len(matches)} test records of run {run!r} with the dev-chosen "
                         f"thresholds [{format_thresholds(th)}] ({best['record'].get('_source')}); expected one")
    return {"dev": best, "test": matches[0]}


def table3(dev: Sequence[dict], test: Sequence[dict], task: str, rates: Optional[Sequence[float]] = None) -> str:
    """MuE's quality at several time-reduction rates (chosen on dev, reported on test); the paper's rate is
    added to ``rates`` and its number shown there."""
    key = quality_key(task)
    paper_rate = PAPER.get(task, {}).get("mue", {}).get("time_reduction")
    rates = sorted(set(rates or DEFAULT_RATES) | ({round(paper_rate / 100, 4)} if paper_rate else set()))
    headers = ["time red. >= (%)", "thresholds (chosen on dev)", f"dev {key}", f"test {key}", "test time red. (%)",
               "test % of full", f"paper {key}"]
    rows = []
    for rate in rates:
        paper = _paper(task, "mue", key) if paper_rate and abs(100 * rate - paper_rate) < 1e-6 else "-"
        pick = select_for_reduction(dev, test, task, rate)
        if pick is None:
            rows.append([f"{100 * rate:g}", "no dev setting saves this much", "n/a", "n/a", "n/a", "n/a", paper])
            continue
        d, t = pick["dev"], pick["test"]
        rows.append([f"{100 * rate:g}", format_thresholds(d["record"]["thresholds"]), pct(d["quality"]),
                     pct(t["quality"]), pct(t["etr"]), pct(t["quality_ratio"]), paper])
    return markdown(headers, rows)


# ------------------------------------------------------------------------------------------ Table 4
def table4(dev: Sequence[dict], test: Sequence[dict], task: str, target: float = 0.99) -> str:
    """Each run (MuE and its ablations) at the dev setting with the largest time reduction that keeps
    ``target`` of the full model's dev quality, on test; then ``tables.ablation_table`` (all levels)."""
    key = quality_key(task)
    present = {r["run"] for r in test if r["task"] == task}
    headers = ["model", f"{key} ours / paper", "time red. (%) ours / paper", "thresholds (chosen on dev)"]
    rows = []
    for run in [name for name in RUN_ORDER if name in present]:
        row = "mue" if run == "mue" else None
        paper_q, paper_t = (_paper(task, row, key), _paper(task, row, "time_reduction")) if row else ("-", "-")
        try:
            s = select_for_target(dev, test, task, target, run=run)
        except NoSettingMeetsTarget:
            rows.append([run, f"n/a / {paper_q}", f"n/a / {paper_t}", f"no dev setting keeps {100 * target:g}%"])
            continue
        rows.append([run, f"{pct(s['test_quality'])} / {paper_q}",
                     f"{pct(s['test_expected_time_reduction'])} / {paper_t}", format_thresholds(s["thresholds"])])
    runs = [r for r in test if r["task"] == task and r["run"] in ("full",) + RUN_ORDER]
    return markdown(headers, rows) + "\n\nAll levels (each run against its own never-exit record):\n\n" + \
        ablation_table(runs, task)


# ------------------------------------------------------------------------------------------ rendering
def render_paper_tables(dev: Sequence[dict], test: Sequence[dict], out_dir: str, title: str = "MuE reproduction",
                        target: float = 0.99) -> str:
    """Write ``out_dir/paper_tables.md`` (Tables 1-4 per task) and the figures; return Table 1 (markdown)."""
    if not test:
        raise ValueError("render_paper_tables: no test records")
    os.makedirs(out_dir, exist_ok=True)
    body = [f"# {title}: the paper's tables",
            "Scores x100. Thresholds are chosen on the dev split, numbers are on the test split. "
            "'ours / paper': the paper's OFA-base numbers (\"-\": not among the paper's numbers listed in "
            "docs/OFA.md)."]
    headline = []
    for task in _tasks(test):
        name = TASK_TITLES.get(task, task)
        t1 = table1(dev, test, task, target)
        headline.append(f"Table 1 ({name}): full model vs MuE, keeping {100 * target:g}% of the full quality on dev\n\n"
                        f"{t1}")
        figure = plot_tradeoff([r for r in test if r["task"] == task], task,
                               os.path.join(out_dir, f"figure_{task}_time_reduction.png"))
        body += [f"## {name}", f"### Table 1: full model vs MuE (target {100 * target:g}% of full on dev)", t1,
                 "### Table 2: image vs text encoder depth (test)", table2(test, task),
                 "### Table 3: trade-off at several time-reduction rates", table3(dev, test, task),
                 f"### Table 4: ablations (target {100 * target:g}% of full on dev)", table4(dev, test, task, target),
                 "### Figure: quality vs expected time reduction (test)", f"![{task}]({os.path.basename(figure)})"]
    with open(os.path.join(out_dir, "paper_tables.md"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(body) + "\n")
    return "\n\n".join(headline)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mue.evaluation.paper_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result JSON files or directories of them (all splits)")
    parser.add_argument("--out", required=True, help="directory for paper_tables.md and the figures")
    parser.add_argument("--dev-split", default="valid")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--target", type=float, default=0.99, help="share of the full dev quality MuE keeps")
    parser.add_argument("--title", default="MuE reproduction")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.INFO)  # fairseq's import leaves the root logger at DEBUG
    records = load_records(args.results)
    dev = [r for r in records if r.get("split") == args.dev_split]
    test = [r for r in records if r.get("split") == args.test_split]
    if not test:
        parser.error(f"no records of split {args.test_split!r} in {args.results}")
    print(render_paper_tables(dev, test, args.out, args.title, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
