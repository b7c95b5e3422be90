"""Caption stage 1 -> stage 2: did the CIDEr-D stage (SCST) pay off, for the full model and for MuE's exits?

The reproduction evaluates the stage-1 checkpoint on the test split at two settings: the full model and the
thresholds chosen on dev for the final (stage-2) model. Each is paired with the final model's test record
at the same setting, and ``paired_bootstrap`` gives stage 2 minus stage 1 with a 95 % interval. The result
is one JSON file per run (``STAGES_DIR/{task}_{run}.json``) and a markdown section of the report.
"""
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

from .paired_bootstrap import compare_records, metric_cells
from .records import format_thresholds

SECTION_TITLE = "Caption stage 1 -> stage 2 (CIDEr-D optimisation)"


def compare_stages(pairs: Sequence[tuple], rounds: int = 2000, seed: int = 1) -> dict:
    """``pairs``: (label, stage-1 test record, final test record) per setting -> {"rows": [...]}, each row
    the label, the thresholds and ``compare_records``' CIDEr and BLEU-4 figures."""
    rows = []
    for label, first, final in pairs:
        rows.append({"setting": label, "thresholds": dict(final["thresholds"]),
                     "n_images": len(final.get("predictions") or ()),
                     "metrics": compare_records(first, final, rounds=rounds, seed=seed)})
    return {"rows": rows, "rounds": rounds, "seed": seed}


def write_comparison(path: str, run: str, comparison: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"run": run, **comparison}, f, indent=1)


def load_comparisons(stages_dir: str) -> List[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(stages_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "rows" in data:
            out.append(data)
    return out


def stage_table(comparisons: Sequence[dict]) -> Optional[str]:
    """The report section (markdown), or None when there is nothing to show."""
    if not comparisons:
        return None
    lines = ["| run | setting | thresholds | metric | stage 1 | stage 2 | difference | 95 % interval |",
             "|---|---|---|---|---|---|---|---|"]
    images = set()
    for comp in comparisons:
        for row in comp["rows"]:
            images.add(row["n_images"])
            lines += [f"| {comp['run']} | {row['setting']} | {format_thresholds(row['thresholds'])} | "
                      f"{metric_cells(metric, r)} |" for metric, r in row["metrics"].items()]
    rounds = comparisons[0].get("rounds")
    lines.append(f"\nTest split ({', '.join(str(n) for n in sorted(images))} images), paired bootstrap over images "
                 f"({rounds} rounds): stage 2 pays off where the interval's lower end is above 0.")
    return "\n".join(lines)


def section(stages_dir: str) -> Dict[str, str]:
    """{title: markdown} for ``render_report``'s extra sections; empty when no comparison was written."""
    table = stage_table(load_comparisons(stages_dir))
    return {SECTION_TITLE: table} if table else {}
