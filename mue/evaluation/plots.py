"""Quality vs saving curves (PNG, matplotlib's Agg backend, no display needed) over result records."""
import os
from typing import Optional, Sequence

from .pareto import pareto_front
from .records import find_baseline, quality_key, quality_of, record_name, tradeoff_rows

__all__ = ["X_AXES", "plot_tradeoff"]

#: what the x axis can show: Eq. 14's expected time reduction, or the measured speedup
X_AXES = ("expected_time_reduction", "speedup")


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
        missing = [record_name(r["record"]) for r in rows if r["speedup"] is None]
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
    q_full = quality_of(base, key)
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
