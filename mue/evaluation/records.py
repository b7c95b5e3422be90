"""Result records: what one evaluation run writes, how to read it, and the numbers read off it.

One JSON record per run at some exit setting (written by ``fairseq-generate --eval-results``)::

    {"task": "caption" | "snli_ve", "run": "mue" | "full" | ..., "split": "test",
     "thresholds": {every exit knob of mue.exiting.config.ExitConfig, e.g. "img_thres", "dec_schedule",
                    "dec_decay_len", ...},
     "metrics": {"CIDEr": ..., ...} or {"accuracy": ...},
     "n_examples": 500, "split_size": 500,
     "exit": ExitStats.summary()}

Conventions (stated once, used by the tables, plots and paper tables):
  * a knob missing from ``thresholds`` took its default (``mue.exiting.config.DEFAULTS``), so records
    written before a knob existed read as that knob's default.
  * quality: ``metrics[quality_key(task)]`` (CIDEr for caption, accuracy for SNLI-VE; every
    function takes ``quality=`` to override).
  * the full model ("baseline"): the record whose run is ``baseline_run`` ("full"); without one,
    the single record that never exits (``is_never_exit``); anything else is an error.
  * "% of full" = 100 * quality / baseline quality; reductions are fractions (0.4 = 40 %).
  * measured speedup = baseline wall-clock / this wall-clock, per example when both records
    give ``n_examples`` (so runs over different subset sizes compare).
  * functions take the records of one task and one split; pass ``split=`` when they are mixed.
"""
import glob
import json
import math
import os
from typing import Iterable, List, Optional, Sequence, Union

from mue.exiting.config import DEFAULTS, THRESHOLD_KNOBS, never_exits

from .pareto import pareto_front

__all__ = [
    "QUALITY_KEYS",
    "NoSettingMeetsTarget",
    "validate_record",
    "load_records",
    "quality_key",
    "with_defaults",
    "format_thresholds",
    "same_thresholds",
    "is_never_exit",
    "record_name",
    "number",
    "quality_of",
    "etr_of",
    "speedup",
    "task_records",
    "find_baseline",
    "tradeoff_rows",
    "select_for_target",
]

QUALITY_KEYS = {"caption": "CIDEr", "snli_ve": "accuracy"}
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
            source = f"{path}[{i}]" if isinstance(data, list) else path
            validate_record(rec, source)
            records.append(dict(rec, _source=source))
    return records


# ---------------------------------------------------------------------------------- settings
def quality_key(task: str, override: Optional[str] = None) -> str:
    """The metric a task's trade-off is measured by (``override`` wins)."""
    if override:
        return override
    if task not in QUALITY_KEYS:
        raise ValueError(f"quality_key: unknown task {task!r}; known {sorted(QUALITY_KEYS)} "
                         f"(pass quality=... to name the metric)")
    return QUALITY_KEYS[task]


def with_defaults(thresholds: dict) -> dict:
    """Every exit knob of a record's ``thresholds``, missing ones at their defaults."""
    return {**DEFAULTS, **thresholds}


def format_thresholds(thresholds: dict) -> str:
    """Compact text of a setting, e.g. ``img 0.9, txt 1, dec 0.8 decay(b0.95,t1,N16), kv drop``."""
    th = with_defaults(thresholds)
    parts = [f"{name[:3]} {float(th[name]):g}" for name in THRESHOLD_KNOBS]
    if th["exit_policy"] == "patience":
        parts[-1] = f"dec patience {int(float(th['exit_patience']))}"
    elif th["exit_policy"] != "cosine":
        parts[-1] = f"dec {th['exit_policy']} H<{float(th['exit_entropy']):g}"
    elif not never_exits(th["dec_thres"]) and th["dec_schedule"] != "constant":
        parts[-1] += (f" {th['dec_schedule']}(b{float(th['dec_decay_beta']):g},t{float(th['dec_decay_tau']):g},"
                      f"N{int(float(th['dec_decay_len']))})")
    if th["kv_policy"] != "copy":
        parts.append(f"kv {th['kv_policy']}")
    parts += [f"{k} {v}" for k, v in thresholds.items() if k not in DEFAULTS]
    return ", ".join(parts).replace("|", "/")


def same_thresholds(a: dict, b: dict) -> bool:
    """Identical settings (missing knobs take their defaults; floats to 1e-9)."""
    ta, tb = with_defaults(a), with_defaults(b)
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


def is_never_exit(rec: dict) -> bool:
    """True when no exit threshold allows an exit and no baseline exit knob is set (--exit-entropy,
    --exit-patience), i.e. the run is the full model's computation."""
    th = with_defaults(rec.get("thresholds", {}))
    return (all(never_exits(th[k]) for k in THRESHOLD_KNOBS)
            and float(th["exit_entropy"]) <= 0 and float(th["exit_patience"]) <= 0)


# ------------------------------------------------------------------------------ record access
def record_name(rec: dict) -> str:
    """How errors name a record: its file, else its run and setting."""
    return rec.get("_source") or f"record run={rec.get('run')!r} [{format_thresholds(rec.get('thresholds', {}))}]"


def number(rec: dict, section: str, key: str, required: bool = True) -> Optional[float]:
    """``rec[section][key]`` as a finite float; None when absent and not ``required``; else an error."""
    value = rec[section].get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{record_name(rec)}: {section}[{key!r}] must be a finite number, got {value!r} "
                         f"(keys: {sorted(rec[section])})")
    return float(value)


def quality_of(rec: dict, key: str) -> float:
    return number(rec, "metrics", key)


def etr_of(rec: dict) -> float:
    """The record's expected time reduction (Eq. 14), a fraction."""
    return number(rec, "exit", "expected_time_reduction")


def _wall_per_example(rec: dict) -> Optional[float]:
    wall = number(rec, "exit", "wall_clock_s", required=False)
    if wall is None or wall <= 0:
        return None
    n = rec.get("n_examples")
    return wall / n if isinstance(n, int) and n > 0 else wall


def speedup(rec: dict, baseline: dict) -> Optional[float]:
    """Measured speedup of ``rec`` over ``baseline`` (module doc); None without wall-clock times."""
    mine, full = _wall_per_example(rec), _wall_per_example(baseline)
    if mine is None or full is None:
        return None
    if isinstance(rec.get("n_examples"), int) != isinstance(baseline.get("n_examples"), int):
        mine, full = rec["exit"]["wall_clock_s"], baseline["exit"]["wall_clock_s"]
    return full / mine


def task_records(records: Sequence[dict], task: str, split: Optional[str] = None) -> List[dict]:
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
    recs = task_records(records, task, split)
    named = [r for r in recs if r["run"] == baseline_run]
    if len(named) > 1:
        named = [r for r in named if is_never_exit(r)] or named
    if len(named) == 1:
        return named[0]
    if named:
        raise ValueError(f"task {task!r}: several records of baseline run {baseline_run!r}: "
                         f"{[record_name(r) for r in named]}")
    never = [r for r in recs if is_never_exit(r)]
    if len(never) == 1:
        return never[0]
    if not never:
        raise ValueError(
            f"task {task!r}: no full-model record: no run named {baseline_run!r} and no record with all "
            f"exit thresholds >= 1 (runs present: {sorted({r['run'] for r in recs})})")
    raise ValueError(
        f"task {task!r}: no run named {baseline_run!r} and several never-exit records "
        f"({[record_name(r) for r in never]}); pass baseline_run=<one of {sorted({r['run'] for r in never})}>")


# -------------------------------------------------------------------------- rows and selection
def tradeoff_rows(records: Sequence[dict], task: str, baseline_run: str = "full",
                  quality: Optional[str] = None, split: Optional[str] = None) -> List[dict]:
    """The numbers of the trade-off table, one dict per record, sorted by expected time reduction.

    Keys: record, quality, quality_ratio, etr, flops_reduction, speedup, image/text/decoder
    layers, pareto (non-dominated in (etr, quality) among all the task's records).
    """
    key = quality_key(task, quality)
    recs = task_records(records, task, split)
    base = find_baseline(recs, task, baseline_run)
    q_full = quality_of(base, key)
    rows = []
    for rec in recs:
        q = quality_of(rec, key)
        ex = rec["exit"]
        rows.append({
            "record": rec,
            "quality": q,
            "quality_ratio": q / q_full if q_full else None,
            "etr": etr_of(rec),
            "flops_reduction": number(rec, "exit", "flops_reduction", required=False),
            "speedup": speedup(rec, base),
            "image_layers": ex.get("mean_image_layers"),
            "text_layers": ex.get("mean_text_layers"),
            "decoder_layers": ex.get("mean_decoder_layers"),
        })
    front = set(pareto_front([(r["etr"], r["quality"]) for r in rows]))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    rows.sort(key=lambda r: (r["etr"], -r["quality"]))
    return rows


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
    dev = task_records(dev_records, task)
    test = task_records(test_records, task)
    dev_full, test_full = find_baseline(dev, task, baseline_run), find_baseline(test, task, baseline_run)
    q_dev_full = quality_of(dev_full, key)
    candidates = [r for r in dev if run is None or r["run"] == run]
    if not candidates:
        raise ValueError(f"select_for_target: no dev records of run {run!r} for task {task!r} "
                         f"(runs: {sorted({r['run'] for r in dev})})")
    ok = [r for r in candidates if quality_of(r, key) >= target * q_dev_full]
    if not ok:
        best = max(quality_of(r, key) for r in candidates)
        raise NoSettingMeetsTarget(
            f"select_for_target: no dev setting of run {run!r} keeps {100 * target:.1f}% of full {key} "
            f"({q_dev_full:.4f}); best is {best:.4f} ({100 * best / q_dev_full:.1f}%)")
    chosen = max(ok, key=lambda r: (etr_of(r), quality_of(r, key)))
    matches = [r for r in test if r["run"] == chosen["run"]
               and same_thresholds(r["thresholds"], chosen["thresholds"])]
    if len(matches) != 1:
        what = "no test record" if not matches else f"{len(matches)} test records"
        raise ValueError(
            f"select_for_target: {what} of run {chosen['run']!r} with the chosen thresholds "
            f"[{format_thresholds(chosen['thresholds'])}] (chosen on dev from {record_name(chosen)}); "
            f"evaluate that setting on test once")
    tst = matches[0]
    q_test, q_test_full = quality_of(tst, key), quality_of(test_full, key)
    return {
        "task": task, "run": chosen["run"], "target": target, "quality_key": key,
        "thresholds": dict(chosen["thresholds"]),
        "dev_quality": quality_of(chosen, key), "dev_full_quality": q_dev_full,
        "dev_expected_time_reduction": etr_of(chosen),
        "test_quality": q_test, "test_full_quality": q_test_full,
        "test_quality_ratio": q_test / q_test_full if q_test_full else None,
        "test_expected_time_reduction": etr_of(tst),
        "test_flops_reduction": number(tst, "exit", "flops_reduction", required=False),
        "test_speedup": speedup(tst, test_full),
        "dev_record": chosen, "test_record": tst,
    }
