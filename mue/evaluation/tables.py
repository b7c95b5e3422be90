"""Markdown tables over result records (mue.evaluation.records): trade-off, image vs text depth,
thresholds chosen on dev for a target quality, and ablations. The conventions (quality, full model,
"% of full", speedup) are those of the records module."""
from typing import List, Optional, Sequence

from .intervals import interval_cells
from .records import (NoSettingMeetsTarget, etr_of, find_baseline, format_thresholds, is_never_exit, quality_key,
                      quality_of, record_name, select_for_target, task_records, tradeoff_rows,
                      with_defaults)

__all__ = ["SINGLE_TIMING", "markdown", "fmt", "pct", "tradeoff_table", "decomposition_table", "target_table",
           "ablation_table", "flops_breakdown_table"]

#: the FLOP components that exits can skip: the encoder streams' layers and the decoder's layers
EXITABLE = ("encoder_image", "encoder_text", "decoder_layers")


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Optional[float], spec: str = "{:.4f}") -> str:
    """A number formatted with ``spec``, "n/a" when missing."""
    return "n/a" if value is None else spec.format(value)


def pct(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal (0.4 -> "40.0"), "n/a" when missing."""
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def _subset_note(recs: Sequence[dict]) -> str:
    """A line naming the records evaluated on part of their split only (empty when none)."""
    partial = [f"{record_name(r)} ({r['n_examples']}/{r['split_size']})" for r in recs
               if isinstance(r.get("n_examples"), int) and isinstance(r.get("split_size"), int)
               and r["n_examples"] != r["split_size"]]
    return ("\n\nNote: evaluated on part of the split only: " + "; ".join(partial)) if partial else ""


# Header of the speed-up columns filled from sweep records: each is one wall-clock timing of one setting
# (mue.benchmarks.timed_settings gives medians of repeated rounds, in their own section)
SINGLE_TIMING = "speedup (x, one timing)"


def tradeoff_table(records: Sequence[dict], task: str, baseline_run: str = "full",
                   quality: Optional[str] = None, split: Optional[str] = None) -> str:
    """Markdown: quality vs cost per record (``records.tradeoff_rows``); ``*`` marks the Pareto front; "% of
    full" with its paired bootstrap 95 % interval where the records carry per-example predictions."""
    key = quality_key(task, quality)
    rows = tradeoff_rows(records, task, baseline_run, quality, split)
    intervals = interval_cells([r["record"] for r in rows],
                               find_baseline(task_records(records, task, split), task, baseline_run), key)
    headers = ["run", "thresholds", key, "% of full", "95 % interval", "time red. (%)", "FLOPs red. (%)",
               SINGLE_TIMING, "image L", "text L", "decoder L", "Pareto"]
    body = [[r["record"]["run"], format_thresholds(r["record"]["thresholds"]), fmt(r["quality"]),
             pct(r["quality_ratio"]), interval, pct(r["etr"]), pct(r["flops_reduction"]),
             fmt(r["speedup"], "{:.2f}"), fmt(r["image_layers"], "{:.2f}"),
             fmt(r["text_layers"], "{:.2f}"), fmt(r["decoder_layers"], "{:.2f}"),
             "*" if r["pareto"] else ""] for r, interval in zip(rows, intervals)]
    return markdown(headers, body) + _subset_note([r["record"] for r in rows])


def decomposition_table(records: Sequence[dict], task: str, baseline_run: str = "full",
                        quality: Optional[str] = None, split: Optional[str] = None) -> str:
    """Markdown: mean image depth vs mean text depth vs quality (the paper's Table 2 idea).

    Records without per-stream depths (joint encoder) are listed under the table, not dropped.
    """
    key = quality_key(task, quality)
    recs = task_records(records, task, split)
    q_full = quality_of(find_baseline(recs, task, baseline_run), key)
    with_streams = [r for r in recs if r["exit"].get("mean_image_layers") is not None
                    and r["exit"].get("mean_text_layers") is not None]
    with_streams.sort(key=lambda r: (r["run"], -r["exit"]["mean_image_layers"], -r["exit"]["mean_text_layers"]))
    headers = ["run", "img thres", "txt thres", "dec thres", "image L", "text L", "decoder L", key, "% of full"]
    body = []
    for r in with_streams:
        th, ex, q = with_defaults(r["thresholds"]), r["exit"], quality_of(r, key)
        body.append([r["run"], f"{float(th['img_thres']):g}", f"{float(th['txt_thres']):g}",
                     f"{float(th['dec_thres']):g}", f"{ex['mean_image_layers']:.2f}",
                     f"{ex['mean_text_layers']:.2f}", fmt(ex.get("mean_decoder_layers"), "{:.2f}"),
                     fmt(q), pct(q / q_full if q_full else None)])
    text = markdown(headers, body)
    listed = {id(r) for r in with_streams}
    missing = [record_name(r) for r in recs if id(r) not in listed]
    if missing:
        text += "\n\nNo per-stream depths (not in this table): " + "; ".join(missing)
    return text


def target_table(dev_records: Sequence[dict], test_records: Sequence[dict], task: str,
                 targets: Sequence[float] = (0.99,), run: Optional[str] = "mue",
                 baseline_run: str = "full", quality: Optional[str] = None) -> str:
    """Markdown, one row per target share: the dev-chosen setting (``records.select_for_target``) and
    its test quality and cost. A target no dev setting reaches gets a row saying so."""
    key = quality_key(task, quality)
    headers = ["target (%)", "run", "thresholds", f"dev {key} (% of full)", f"test {key}",
               "test % of full", "time red. (%)", "FLOPs red. (%)", SINGLE_TIMING]
    body = []
    for t in targets:
        try:
            s = select_for_target(dev_records, test_records, task, t, run, baseline_run, quality)
        except NoSettingMeetsTarget as e:
            body.append([f"{100 * t:.1f}", run or "any", f"none: {e}".replace("|", "/")] + ["n/a"] * 6)
            continue
        dev_ratio = s["dev_quality"] / s["dev_full_quality"] if s["dev_full_quality"] else None
        body.append([f"{100 * t:.1f}", s["run"], format_thresholds(s["thresholds"]),
                     f"{s['dev_quality']:.4f} ({pct(dev_ratio)})",
                     f"{s['test_quality']:.4f}", pct(s["test_quality_ratio"]),
                     pct(s["test_expected_time_reduction"]), pct(s["test_flops_reduction"]),
                     fmt(s["test_speedup"], "{:.2f}")])
    return markdown(headers, body)


def ablation_table(records: Sequence[dict], task: str, levels: Sequence[float] = (0.99, 0.96),
                   baseline_run: str = "full", quality: Optional[str] = None,
                   split: Optional[str] = None) -> str:
    """Markdown, one row per run: for each level, the largest expected time reduction that keeps
    >= level x the run's own full quality (its never-exit record; without one, the baseline's),
    the quality there, and the run's max quality."""
    key = quality_key(task, quality)
    recs = task_records(records, task, split)
    runs = list(dict.fromkeys(r["run"] for r in recs))
    runs.sort(key=lambda name: (name != baseline_run, name != "mue"))  # stable: else first appearance
    headers = ["run", "reference", f"ref. {key}", f"max {key}"]
    for lv in levels:
        headers += [f"time red. (%) at >= {100 * lv:g}%", f"{key} at >= {100 * lv:g}%"]
    body: List[list] = []
    for name in runs:
        mine = [r for r in recs if r["run"] == name]
        own = [r for r in mine if is_never_exit(r)]
        if len(own) > 1:
            raise ValueError(f"run {name!r}: several never-exit records {[record_name(r) for r in own]}")
        ref, ref_name = (own[0], "own") if own else (find_baseline(recs, task, baseline_run), "full model")
        q_ref = quality_of(ref, key)
        row = [name, ref_name, fmt(q_ref), fmt(max(quality_of(r, key) for r in mine))]
        for lv in levels:
            ok = [r for r in mine if quality_of(r, key) >= lv * q_ref]
            if ok:
                best = max(ok, key=lambda r: (etr_of(r), quality_of(r, key)))
                row += [pct(etr_of(best)), fmt(quality_of(best, key))]
            else:
                row += ["none", "n/a"]
        body.append(row)
    return markdown(headers, body)


def flops_breakdown_table(records: Sequence[dict], task: str, baseline_run: str = "full",
                          split: Optional[str] = None) -> str:
    """Markdown: where the full model's FLOPs go (``exit.flops_by_component`` of its record), and the share
    in the layers that exits can skip, which bounds any FLOP saving."""
    base = find_baseline(task_records(records, task, split), task, baseline_run)
    parts = (base.get("exit") or {}).get("flops_by_component")
    if not parts:
        return "No FLOP breakdown in the full model's record."
    full = {name: float(v["full"]) for name, v in parts.items()}
    total = sum(full.values())
    if total <= 0:
        return "No FLOP breakdown in the full model's record (0 FLOPs)."
    rows = [[name, f"{v / 1e9:.3f}", pct(v / total)] for name, v in full.items() if v > 0]
    exitable = sum(full.get(name, 0.0) for name in EXITABLE)
    return (markdown(["component", "GFLOPs", "% of the full model"], rows) +
            f"\n\nThe layers that exits skip (image and text streams, decoder layers) are {pct(exitable / total)} % "
            "of the full model's FLOPs: the most any exit setting can save (less in practice, since every "
            "stream runs its first layer).")
