"""Trade-off reports from evaluation result records: markdown tables, threshold selection, plots.

Pure functions over the JSON records the evaluation writes, one per run at some thresholds::

    {"task": "caption" | "snli_ve", "run": "mue" | "full" | ..., "split": "test",
     "thresholds": {"img_thres", "txt_thres", "dec_thres", "dec_schedule", "dec_decay_beta",
                    "dec_decay_tau", "kv_policy"},
     "metrics": {"CIDEr": ..., ...} or {"accuracy": ...},
     "n_examples": 500, "split_size": 500,
     "exit": ExitStats.summary()}

Conventions (stated once, used everywhere):
  * quality: ``metrics[quality_key(task)]`` (CIDEr for caption, accuracy for SNLI-VE; every
    function takes ``quality=`` to override).
  * the full model ("baseline"): the record whose run is ``baseline_run`` ("full"); without one,
    the single record whose exit thresholds are all >= 1 (never exits); anything else is an error.
  * "% of full" = 100 * quality / baseline quality; reductions are in % (0.4 -> 40.0).
  * measured speedup = baseline wall-clock / this wall-clock, per example when both records
    give ``n_examples`` (so runs over different subset sizes compare).
  * tables take the records of one task and one split; pass ``split=`` when they are mixed.

Command line::

    python -m mue.evaluation.report RESULTS_DIR_OR_FILES... --out DIR [--target 0.99 --dev-dir DIR]
"""
import argparse
import glob
import json
import logging
import math
import os
import re
import sys
from typing import Iterable, List, Optional, Sequence, Union

from .pareto import pareto_front

__all__ = [
    "QUALITY_KEYS",
    "THRESHOLD_DEFAULTS",
    "NoSettingMeetsTarget",
    "load_records",
    "validate_record",
    "quality_key",
    "is_never_exit",
    "find_baseline",
    "format_thresholds",
    "same_thresholds",
    "tradeoff_rows",
    "tradeoff_table",
    "decomposition_table",
    "select_for_target",
    "target_table",
    "ablation_table",
    "plot_tradeoff",
    "render_report",
    "main",
]

QUALITY_KEYS = {"caption": "CIDEr", "snli_ve": "accuracy"}
# the task options' defaults (mue/tasks/vl_task.py): a record lacking a key used them
THRESHOLD_DEFAULTS = {
    "img_thres": 1.0,
    "txt_thres": 1.0,
    "dec_thres": 1.0,
    "dec_schedule": "constant",
    "dec_decay_beta": 0.95,
    "dec_decay_tau": 1.0,
    "kv_policy": "copy",
    "exit_policy": "cosine",  # decoder exit rule (mue.exiting.baselines) and the baselines' knobs
    "exit_entropy": 0.0,
    "exit_patience": 0,
}
EXIT_THRESHOLDS = ("img_thres", "txt_thres", "dec_thres")
X_AXES = ("expected_time_reduction", "speedup")
_REQUIRED = {"task": str, "run": str, "thresholds": dict, "metrics": dict, "exit": dict}


class NoSettingMeetsTarget(ValueError):
    """No dev setting keeps the asked share of the full model's quality."""


# ------------------------------------------------------------------------------------- loading
def validate_record(record, where: str) -> dict:
    """Check the keys every report needs; ``where`` names the record in errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a result record must be a JSON object, got {type(record).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in record:
            raise ValueError(f"{where}: result record lacks {key!r} (has {sorted(record)})")
        if not isinstance(record[key], kind):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {record[key]!r}")
    return record


def load_records(paths_or_dir: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> List[dict]:
    """Read result records from JSON files; a directory means all ``*.json`` in it (sorted).

    A file holds one record (object) or a list of them.  Each record gets ``"_source"``
    (``path`` or ``path[i]``) so later errors can name it.
    """
    if isinstance(paths_or_dir, (str, os.PathLike)):
        paths_or_dir = [paths_or_dir]
    files = []
    for p in paths_or_dir:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.json")))
            if not found:
                raise FileNotFoundError(f"load_records: no *.json result files in directory {p}")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"load_records: no such file or directory: {p}")
    records = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
                ) from None
        items = data if isinstance(data, list) else [data]
        for i, rec in enumerate(items):
            where = f"{path}[{i}]" if isinstance(data, list) else path
            validate_record(rec, where)
            records.append(dict(rec, _source=where))
    return records


# ------------------------------------------------------------------------------ record access
def quality_key(task: str, override: Optional[str] = None) -> str:
    """The metric a task's trade-off is measured by (``override`` wins)."""
    if override:
        return override
    if task not in QUALITY_KEYS:
        raise ValueError(f"quality_key: unknown task {task!r}; known {sorted(QUALITY_KEYS)} "
                         f"(pass quality=... to name the metric)")
    return QUALITY_KEYS[task]


def _thresholds(rec: dict) -> dict:
    return {**THRESHOLD_DEFAULTS, **rec.get("thresholds", {})}


def format_thresholds(thresholds: dict) -> str:
    """Compact text of a setting, e.g. ``img 0.9, txt 1, dec 0.8 decay(b0.95,t1), kv drop``."""
    th = {**THRESHOLD_DEFAULTS, **thresholds}
    parts = [f"{name[:3]} {float(th[name]):g}" for name in EXIT_THRESHOLDS]
    if th["exit_policy"] == "patience":
        parts[-1] = f"dec patience {int(float(th['exit_patience']))}"
    elif th["exit_policy"] != "cosine":
        parts[-1] = f"dec {th['exit_policy']} H<{float(th['exit_entropy']):g}"
    elif float(th["dec_thres"]) < 1 and th["dec_schedule"] != "constant":
        parts[-1] += f" {th['dec_schedule']}(b{float(th['dec_decay_beta']):g},t{float(th['dec_decay_tau']):g})"
    if th["kv_policy"] != "copy":
        parts.append(f"kv {th['kv_policy']}")
    parts += [f"{k} {v}" for k, v in thresholds.items() if k not in THRESHOLD_DEFAULTS]
    return ", ".join(parts).replace("|", "/")


def _where(rec: dict) -> str:
    return rec.get("_source") or f"record run={rec.get('run')!r} [{format_thresholds(rec.get('thresholds', {}))}]"


def is_never_exit(rec: dict) -> bool:
    """True when all exit thresholds are >= 1 and no baseline exit knob is set (--exit-entropy,
    --exit-patience), i.e. the run is the full model's computation."""
    th = _thresholds(rec)
    return (all(float(th[k]) >= 1.0 for k in EXIT_THRESHOLDS)
            and float(th["exit_entropy"]) <= 0 and float(th["exit_patience"]) <= 0)


def same_thresholds(a: dict, b: dict) -> bool:
    """Identical settings (missing keys take the task defaults; floats to 1e-9)."""
    ta, tb = {**THRESHOLD_DEFAULTS, **a}, {**THRESHOLD_DEFAULTS, **b}
    if set(ta) != set(tb):
        return False
    for k in ta:
        x, y = ta[k], tb[k]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


def _number(rec: dict, section: str, key: str, required: bool = True) -> Optional[float]:
    value = rec[section].get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_where(rec)}: {section}[{key!r}] must be a finite number, got {value!r} "
                         f"(keys: {sorted(rec[section])})")
    return float(value)


def _quality(rec: dict, key: str) -> float:
    return _number(rec, "metrics", key)


def _etr(rec: dict) -> float:
    return _number(rec, "exit", "expected_time_reduction")


def _wall_per_example(rec: dict) -> Optional[float]:
    wall = _number(rec, "exit", "wall_clock_s", required=False)
    if wall is None or wall <= 0:
        return None
    n = rec.get("n_examples")
    return wall / n if isinstance(n, int) and n > 0 else wall


def _speedup(rec: dict, baseline: dict) -> Optional[float]:
    mine, full = _wall_per_example(rec), _wall_per_example(baseline)
    if mine is None or full is None:
        return None
    if isinstance(rec.get("n_examples"), int) != isinstance(baseline.get("n_examples"), int):
        mine, full = rec["exit"]["wall_clock_s"], baseline["exit"]["wall_clock_s"]
    return full / mine


def _task_records(records: Sequence[dict], task: str, split: Optional[str] = None) -> List[dict]:
    """The records of one task (and split); several splits without ``split=`` is an error."""
    for i, rec in enumerate(records):
        validate_record(rec, rec.get("_source", f"records[{i}]") if isinstance(rec, dict) else f"records[{i}]")
    recs = [r for r in records if r["task"] == task and (split is None or r.get("split") == split)]
    if not recs:
        have = sorted({(r["task"], str(r.get("split"))) for r in records})
        raise ValueError(f"no result records for task {task!r}"
                         + (f" split {split!r}" if split else "") + f"; have (task, split): {have}")
    splits = sorted({str(r.get("split")) for r in recs})
    if len(splits) > 1:
        raise ValueError(f"records of task {task!r} mix splits {splits}; pass split=... to pick one")
    return recs


def find_baseline(records: Sequence[dict], task: str, baseline_run: str = "full",
                  split: Optional[str] = None) -> dict:
    """The full model's record (see the module doc); a clear error when there is none or several."""
    recs = _task_records(records, task, split)
    named = [r for r in recs if r["run"] == baseline_run]
    if len(named) > 1:
        named = [r for r in named if is_never_exit(r)] or named
    if len(named) == 1:
        return named[0]
    if named:
        raise ValueError(f"task {task!r}: several records of baseline run {baseline_run!r}: "
                         f"{[_where(r) for r in named]}")
    never = [r for r in recs if is_never_exit(r)]
    if len(never) == 1:
        return never[0]
    if not never:
        raise ValueError(
            f"task {task!r}: no full-model record: no run named {baseline_run!r} and no record with all "
            f"exit thresholds >= 1 (runs present: {sorted({r['run'] for r in recs})})")
    raise ValueError(
        f"task {task!r}: no run named {baseline_run!r} and several never-exit records "
        f"({[_where(r) for r in never]}); pass baseline_run=<one of {sorted({r['run'] for r in never})}>")


# --------------------------------------------------------------------------------- markdown
def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str = "{:.4f}") -> str:
    return "n/a" if value is None else spec.format(value)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}"


# ----------------------------------------------------------------------------- trade-off table
def tradeoff_rows(records: Sequence[dict], task: str, baseline_run: str = "full",
                  quality: Optional[str] = None, split: Optional[str] = None) -> List[dict]:
    """The numbers of the trade-off table, one dict per record, sorted by expected time reduction.

    Keys: record, quality, quality_ratio, etr, flops_reduction, speedup, image/text/decoder
    layers, pareto (non-dominated in (etr, quality) among all the task's records).
    """
    key = quality_key(task, quality)
    recs = _task_records(records, task, split)
    base = find_baseline(recs, task, baseline_run)
    q_full = _quality(base, key)
    rows = []
    for rec in recs:
        q = _quality(rec, key)
        ex = rec["exit"]
        rows.append({
            "record": rec,
            "quality": q,
            "quality_ratio": q / q_full if q_full else None,
            "etr": _etr(rec),
            "flops_reduction": _number(rec, "exit", "flops_reduction", required=False),
            "speedup": _speedup(rec, base),
            "image_layers": ex.get("mean_image_layers"),
            "text_layers": ex.get("mean_text_layers"),
            "decoder_layers": ex.get("mean_decoder_layers"),
        })
    front = set(pareto_front([(r["etr"], r["quality"]) for r in rows]))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    rows.sort(key=lambda r: (r["etr"], -r["quality"]))
    return rows


def _subset_note(recs: Sequence[dict]) -> str:
    partial = [f"{_where(r)} ({r['n_examples']}/{r['split_size']})" for r in recs
               if isinstance(r.get("n_examples"), int) and isinstance(r.get("split_size"), int)
               and r["n_examples"] != r["split_size"]]
    return ("\n\nNote: evaluated on part of the split only: " + "; ".join(partial)) if partial else ""


def tradeoff_table(records: Sequence[dict], task: str, baseline_run: str = "full",
                   quality: Optional[str] = None, split: Optional[str] = None) -> str:
    """Markdown: quality vs cost per record (columns in the module doc); ``*`` marks the Pareto front."""
    key = quality_key(task, quality)
    rows = tradeoff_rows(records, task, baseline_run, quality, split)
    headers = ["run", "thresholds", key, "% of full", "time red. (%)", "FLOPs red. (%)",
               "speedup (x)", "image L", "text L", "decoder L", "Pareto"]
    body = [[r["record"]["run"], format_thresholds(r["record"]["thresholds"]), _fmt(r["quality"]),
             _pct(r["quality_ratio"]), _pct(r["etr"]), _pct(r["flops_reduction"]),
             _fmt(r["speedup"], "{:.2f}"), _fmt(r["image_layers"], "{:.2f}"),
             _fmt(r["text_layers"], "{:.2f}"), _fmt(r["decoder_layers"], "{:.2f}"),
             "*" if r["pareto"] else ""] for r in rows]
    return _markdown(headers, body) + _subset_note([r["record"] for r in rows])


# ------------------------------------------------------------------------- decomposition table
def decomposition_table(records: Sequence[dict], task: str, baseline_run: str = "full",
                        quality: Optional[str] = None, split: Optional[str] = None) -> str:
    """Markdown: mean image depth vs mean text depth vs quality (the paper's Table 2 idea).

    Records without per-stream depths (joint encoder) are listed under the table, not dropped.
    """
    key = quality_key(task, quality)
    recs = _task_records(records, task, split)
    q_full = _quality(find_baseline(recs, task, baseline_run), key)
    with_streams = [r for r in recs if r["exit"].get("mean_image_layers") is not None
                    and r["exit"].get("mean_text_layers") is not None]
    with_streams.sort(key=lambda r: (r["run"], -r["exit"]["mean_image_layers"], -r["exit"]["mean_text_layers"]))
    headers = ["run", "img thres", "txt thres", "dec thres", "image L", "text L", "decoder L", key, "% of full"]
    body = []
    for r in with_streams:
        th, ex, q = _thresholds(r), r["exit"], _quality(r, key)
        body.append([r["run"], f"{float(th['img_thres']):g}", f"{float(th['txt_thres']):g}",
                     f"{float(th['dec_thres']):g}", f"{ex['mean_image_layers']:.2f}",
                     f"{ex['mean_text_layers']:.2f}", _fmt(ex.get("mean_decoder_layers"), "{:.2f}"),
                     _fmt(q), _pct(q / q_full if q_full else None)])
    text = _markdown(headers, body)
    listed = {id(r) for r in with_streams}
    missing = [_where(r) for r in recs if id(r) not in listed]
    if missing:
        text += "\n\nNo per-stream depths (not in this table): " + "; ".join(missing)
    return text


# ---------------------------------------------------------------------------- target selection
def select_for_target(dev_records: Sequence[dict], test_records: Sequence[dict], task: str,
                      target: float = 0.99, run: Optional[str] = "mue", baseline_run: str = "full",
                      quality: Optional[str] = None) -> dict:
    """Choose thresholds on dev, report them on test.

    On dev: among records of ``run`` (all runs when None), the largest expected time reduction
    whose quality >= ``target`` x the dev full model's (ties: higher quality).  On test: the record
    of the same run with identical thresholds (error if missing).  Raises ``NoSettingMeetsTarget``
    when no dev setting keeps the target.
    """
    if not (0 < target <= 1.5):
        raise ValueError(f"select_for_target: target is a share of full quality, e.g. 0.99; got {target}")
    key = quality_key(task, quality)
    dev = _task_records(dev_records, task)
    test = _task_records(test_records, task)
    dev_full, test_full = find_baseline(dev, task, baseline_run), find_baseline(test, task, baseline_run)
    q_dev_full = _quality(dev_full, key)
    candidates = [r for r in dev if run is None or r["run"] == run]
    if not candidates:
        raise ValueError(f"select_for_target: no dev records of run {run!r} for task {task!r} "
                         f"(runs: {sorted({r['run'] for r in dev})})")
    ok = [r for r in candidates if _quality(r, key) >= target * q_dev_full]
    if not ok:
        best = max(_quality(r, key) for r in candidates)
        raise NoSettingMeetsTarget(
            f"select_for_target: no dev setting of run {run!r} keeps {100 * target:.1f}% of full {key} "
            f"({q_dev_full:.4f}); best is {best:.4f} ({100 * best / q_dev_full:.1f}%)")
    chosen = max(ok, key=lambda r: (_etr(r), _quality(r, key)))
    matches = [r for r in test if r["run"] == chosen["run"]
               and same_thresholds(r["thresholds"], chosen["thresholds"])]
    if len(matches) != 1:
        what = "no test record" if not matches else f"{len(matches)} test records"
        raise ValueError(
            f"select_for_target: {what} of run {chosen['run']!r} with the chosen thresholds "
            f"[{format_thresholds(chosen['thresholds'])}] (chosen on dev from {_where(chosen)}); "
            f"evaluate that setting on test once")
    tst = matches[0]
    q_test, q_test_full = _quality(tst, key), _quality(test_full, key)
    return {
        "task": task, "run": chosen["run"], "target": target, "quality_key": key,
        "thresholds": dict(chosen["thresholds"]),
        "dev_quality": _quality(chosen, key), "dev_full_quality": q_dev_full,
        "dev_expected_time_reduction": _etr(chosen),
        "test_quality": q_test, "test_full_quality": q_test_full,
        "test_quality_ratio": q_test / q_test_full if q_test_full else None,
        "test_expected_time_reduction": _etr(tst),
        "test_flops_reduction": _number(tst, "exit", "flops_reduction", required=False),
        "test_speedup": _speedup(tst, test_full),
        "dev_record": chosen, "test_record": tst,
    }


def target_table(dev_records: Sequence[dict], test_records: Sequence[dict], task: str,
                 targets: Sequence[float] = (0.99,), run: Optional[str] = "mue",
                 baseline_run: str = "full", quality: Optional[str] = None) -> str:
    """Markdown, one row per target share: the dev-chosen setting and its test quality and cost.
    A target no dev setting reaches gets a row saying so."""
    key = quality_key(task, quality)
    headers = ["target (%)", "run", "thresholds", f"dev {key} (% of full)", f"test {key}",
               "test % of full", "time red. (%)", "FLOPs red. (%)", "speedup (x)"]
    body = []
    for t in targets:
        try:
            s = select_for_target(dev_records, test_records, task, t, run, baseline_run, quality)
        except NoSettingMeetsTarget as e:
            body.append([f"{100 * t:.1f}", run or "any", f"none: {e}".replace("|", "/")] + ["n/a"] * 6)
            continue
        body.append([f"{100 * t:.1f}", s["run"], format_thresholds(s["thresholds"]),
                     f"{s['dev_quality']:.4f} ({_pct(s['dev_quality'] / s['dev_full_quality'] if s['dev_full_quality'] else None)})",
                     f"{s['test_quality']:.4f}", _pct(s["test_quality_ratio"]),
                     _pct(s["test_expected_time_reduction"]), _pct(s["test_flops_reduction"]),
                     _fmt(s["test_speedup"], "{:.2f}")])
    return _markdown(headers, body)


# ------------------------------------------------------------------------------ ablation table
def ablation_table(records: Sequence[dict], task: str, levels: Sequence[float] = (0.99, 0.96),
                   baseline_run: str = "full", quality: Optional[str] = None,
                   split: Optional[str] = None) -> str:
    """Markdown, one row per run: for each level, the largest expected time reduction that keeps
    >= level x the run's own full quality (its never-exit record; without one, the baseline's),
    the quality there, and the run's max quality."""
    key = quality_key(task, quality)
    recs = _task_records(records, task, split)
    runs = list(dict.fromkeys(r["run"] for r in recs))
    runs.sort(key=lambda name: (name != baseline_run, name != "mue"))  # stable: else first appearance
    headers = ["run", "reference", f"ref. {key}", f"max {key}"]
    for lv in levels:
        headers += [f"time red. (%) at >= {100 * lv:g}%", f"{key} at >= {100 * lv:g}%"]
    body = []
    for name in runs:
        mine = [r for r in recs if r["run"] == name]
        own = [r for r in mine if is_never_exit(r)]
        if len(own) > 1:
            raise ValueError(f"run {name!r}: several never-exit records {[_where(r) for r in own]}")
        ref, ref_name = (own[0], "own") if own else (find_baseline(recs, task, baseline_run), "full model")
        q_ref = _quality(ref, key)
        row = [name, ref_name, _fmt(q_ref), _fmt(max(_quality(r, key) for r in mine))]
        for lv in levels:
            ok = [r for r in mine if _quality(r, key) >= lv * q_ref]
            if ok:
                best = max(ok, key=lambda r: (_etr(r), _quality(r, key)))
                row += [_pct(_etr(best)), _fmt(_quality(best, key))]
            else:
                row += ["none", "n/a"]
        body.append(row)
    return _markdown(headers, body)


# -------------------------------------------------------------------------------------- plots
def plot_tradeoff(records: Sequence[dict], task: str, path: str, x: str = "expected_time_reduction",
                  baseline_run: str = "full", quality: Optional[str] = None,
                  split: Optional[str] = None, frontier_run: str = "mue") -> str:
    """Save a PNG of quality vs saving, one marker set per run with a line through the run's own
    Pareto front (``frontier_run``'s drawn bold), the full model as a dashed horizontal line.

    ``x``: ``"expected_time_reduction"`` (Eq. 14, %) or ``"speedup"`` (measured, needs wall-clock
    in every record).  Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ValueError(f"plot_tradeoff: x must be one of {X_AXES}, got {x!r}")
    key = quality_key(task, quality)
    rows = tradeoff_rows(records, task, baseline_run, quality, split)
    base = find_baseline(records, task, baseline_run, split)
    if x == "speedup":
        missing = [_where(r["record"]) for r in rows if r["speedup"] is None]
        if missing:
            raise ValueError(f"plot_tradeoff: no wall-clock time (exit.wall_clock_s > 0) in {missing}")

    def xval(r):
        return 100.0 * r["etr"] if x == "expected_time_reduction" else r["speedup"]

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    runs = list(dict.fromkeys(r["record"]["run"] for r in rows if r["record"]["run"] != baseline_run))
    for i, name in enumerate(runs):
        pts = [(xval(r), r["quality"]) for r in rows if r["record"]["run"] == name]
        color = f"C{i % 10}"
        bold = name == frontier_run
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker="os^Dvx+"[i % 7],
                   alpha=0.8 if bold else 0.55, label=name, zorder=3)
        front = sorted(pts[j] for j in pareto_front(pts))
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color,
                lw=2.4 if bold else 1.0, alpha=0.9 if bold else 0.6,
                label=f"{name} Pareto front" if bold else None, zorder=2)
    q_full = _quality(base, key)
    base_row = next(r for r in rows if r["record"] is base)
    ax.scatter([xval(base_row)], [q_full], color="k", marker="*", s=90, zorder=4)
    ax.axhline(q_full, color="gray", ls="--", lw=1.2, label=f"full model ({q_full:.4g})")
    ax.set_xlabel("expected time reduction, Eq. 14 (%)" if x == "expected_time_reduction"
                  else "measured speedup vs full model (x)")
    ax.set_ylabel(key)
    ax.set_title(f"{task}: {key} vs " + ("expected time reduction" if x != "speedup" else "speedup"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------- report
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def render_report(records: Sequence[dict], out_dir: str, title: str = "MuE evaluation report",
                  dev_records: Optional[Sequence[dict]] = None, targets: Sequence[float] = (0.99,),
                  baseline_run: str = "full", quality: Optional[str] = None) -> str:
    """Write ``out_dir/report.md`` (all tables, per task and split) and the PNG plots; return the
    headline markdown (the trade-off tables).  With ``dev_records``, add the target-selection
    table (thresholds chosen on dev, reported on ``records``)."""
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
        body += ["### Image depth vs text depth", decomposition_table(recs, task, baseline_run, quality),
                 "### Runs (ablations)", ablation_table(recs, task, baseline_run=baseline_run, quality=quality)]
        if dev_records and any(r.get("task") == task for r in dev_records):
            body += [f"### Thresholds chosen on dev, reported on {split}",
                     target_table(dev_records, recs, task, targets, baseline_run=baseline_run, quality=quality)]
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
