"""Quality at a forced depth: the full model cut to its first K layers (``--exit-depth K``, thresholds 1), for
K = 1..L, on the test split. It says whether depth matters on a benchmark (a task solved at two layers
leaves nothing for an exit policy to trade) and how usable each layer is as an exit.

The reproduction writes one record per K (``FORCED_DIR/records``, the sweep's record format; K = L is the
full model's own record) and the report shows them per task with "% of full" and its paired bootstrap
95 % interval (mue.evaluation.intervals).
"""
from typing import Dict, List, Optional, Sequence

from .intervals import interval_cells
from .records import find_baseline, load_records, quality_key, quality_of
from .tables import fmt, markdown, pct

SECTION_TITLE = "Forced depth: the full model cut to its first K layers (test)"


def depth_of(record: dict, full_layers: int) -> int:
    """The forced depth of a record: its --exit-depth, or all layers when there is none."""
    return int((record.get("thresholds") or {}).get("exit_depth") or 0) or full_layers


def forced_depth_table(forced: Sequence[dict], full: dict, task: str) -> Optional[str]:
    """Markdown: quality by forced depth for one task (``forced``: its --exit-depth records; ``full``: the
    full model's record), or None when there are none."""
    recs = [r for r in forced if r.get("task") == task]
    if not recs:
        return None
    key = quality_key(task)
    layers = int((full.get("exit") or {}).get("n_dec_layers") or 0)
    by_depth = {depth_of(r, layers): r for r in recs}
    by_depth[layers] = full
    q_full = quality_of(full, key)
    depths = sorted(by_depth)
    intervals = interval_cells([by_depth[d] for d in depths], full, key)
    rows = []
    for depth, interval in zip(depths, intervals):
        rec = by_depth[depth]
        q = quality_of(rec, key)
        rows.append([str(depth), fmt(q), pct(q / q_full if q_full else None), interval,
                     pct((rec.get("exit") or {}).get("flops_reduction"))])
    text = markdown(["layers run (K)", key, "% of full", "95 % interval", "FLOPs red. (%)"], rows)
    if 2 in by_depth and q_full:
        text += (f"\n\nLayer 2 keeps {100 * quality_of(by_depth[2], key) / q_full:.1f} % of the full model's "
                 f"{key} (a benchmark where depth matters: at most 85 %).")
    return text


def section(forced_dir: str, runs: Sequence[dict], split: str = "test") -> Dict[str, str]:
    """{title: markdown} for ``render_report``'s extra sections, per task with forced-depth records in
    ``forced_dir`` (their full models among the sweep records ``runs``); empty when there are none."""
    import os

    if not os.path.isdir(forced_dir):
        return {}
    forced = [r for r in load_records(forced_dir) if r.get("split") == split]
    if not forced:
        return {}
    runs = [r for r in runs if r.get("split") == split]
    parts: List[str] = []
    for task in sorted({r["task"] for r in forced}):
        table = forced_depth_table(forced, find_baseline(runs, task), task)
        if table:
            parts += [f"### {task}", table]
    return {SECTION_TITLE: "\n\n".join(parts)} if parts else {}
