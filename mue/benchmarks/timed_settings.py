"""Wall-clock speed-ups that hold still: a trained checkpoint timed at a few exit settings on one split.

The sweep's records each carry one timing, taken in their own fairseq-generate process; on a busy or small
machine one timing moves by several per cent from run to run. Here the model is loaded once, the batches
are made once, and the settings are timed in turn, round after round (the order rotating), so that what
slows the machine down hits all of them alike. Each setting's time is the median of ``--repeats`` rounds,
and its speed-up over the first setting (the full model) is the median of the per-round ratios, with their
smallest and largest.

What is timed: the generator's own clock, as in the sweep's records (``exit.wall_clock_s``: beam search or
answer scoring per batch, exits and their bookkeeping included), not data loading or metrics.

    python -m mue.benchmarks.timed_settings CKPT.pt DATA.tsv --setting 1,1,1 --setting 0.99,0.99,0.99 \
        [--repeats 3] [--max-examples 500] [--batch-size 100] [--knob dec_schedule=decay ...] [--json OUT]

The first setting is the baseline; the report shows the result (``section``).
"""
import argparse
import json
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

SECTION_TITLE = "Wall-clock speed-ups, timed again (median of repeated rounds)"


def time_settings(checkpoint: str, data_tsv: str, settings: Sequence[Dict[str, float]], repeats: int = 3,
                  max_examples: Optional[int] = None, batch_size: int = 100, knobs: Optional[dict] = None,
                  generation: Optional[dict] = None, device: str = "cpu") -> dict:
    """Time ``settings`` (dicts of exit knobs, e.g. {"img_thres": 0.99, ...}; the first is the baseline)
    on the first ``max_examples`` examples of ``data_tsv`` (OFA TSV of the checkpoint's task), ``repeats``
    rounds. ``knobs``: exit knobs shared by every setting (e.g. the decaying decoder schedule);
    ``generation``: fairseq generation options (captioning default: the sweep's beam 5, 16 tokens, no
    repeated 3-grams); ``device``: where the model runs. Returns {"task", "n_examples", "repeats",
    "settings": [{"thresholds", "seconds", "median_s", "speedup", "speedup_low", "speedup_high"}], ...}."""
    from fairseq import utils as fairseq_utils

    import mue
    from mue.api.model import CAPTION_DEFAULTS
    from mue.data.readers import OfaCaptionTsv, OfaSnliVeTsv

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not settings:
        raise ValueError("no settings to time")
    model = mue.load(checkpoint, device=device, **(knobs or {}))
    if len(model.tasks) != 1:
        raise ValueError(f"{checkpoint} answers {sorted(model.tasks)}: time a checkpoint fine-tuned for one task")
    (kind, task), = model.tasks.items()
    reader = (OfaCaptionTsv if kind == "caption" else OfaSnliVeTsv)(data_tsv)
    dataset = task.build_dataset("timing", reader, is_train=False)
    order = list(dataset.ordered_indices())[: max_examples or None]
    batches = []
    for start in range(0, len(order), batch_size):
        sample = dataset.collater([dataset[i] for i in order[start:start + batch_size]])
        for key in ("refs", "labels", "answers"):  # nothing is evaluated: only the generation is timed
            sample.pop(key, None)
        if model.device.type != "cpu":
            sample = fairseq_utils.apply_to_sample(lambda t: t.to(model.device), sample)
        batches.append(sample)
    options = {**CAPTION_DEFAULTS, **(generation or {})} if kind == "caption" else dict(generation or {})
    base = vars_of(model.thresholds)  # the shared knobs; each setting overrides its thresholds

    def run(setting, samples) -> float:
        generator = model.generator(task, options, {**base, **setting})
        with torch.no_grad():
            for sample in samples:
                task.inference_step(generator, [model.model], sample)
        return generator.stats.wall_clock_s

    for setting in settings:  # warm-up (allocations, caches), not kept
        run(setting, batches[:1])
    seconds: List[List[float]] = [[] for _ in settings]
    for r in range(repeats):
        for k in [(r + i) % len(settings) for i in range(len(settings))]:
            seconds[k].append(run(settings[k], batches))
    rows = []
    for setting, times in zip(settings, seconds):
        ratios = [b / t for b, t in zip(seconds[0], times)]
        rows.append({"thresholds": dict(setting), "seconds": times, "median_s": statistics.median(times),
                     "speedup": statistics.median(ratios), "speedup_low": min(ratios), "speedup_high": max(ratios)})
    return {"task": kind, "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data_tsv),
            "n_examples": len(order), "batch_size": batch_size, "repeats": repeats, "knobs": dict(knobs or {}),
            "settings": rows, "threads": torch.get_num_threads(), "device": str(model.device)}


def vars_of(config) -> dict:
    """The exit knobs of an ExitConfig as a dict."""
    from mue.exiting.config import EXIT_KNOBS

    return {name: getattr(config, name) for name in EXIT_KNOBS}


def timing_table(result: dict, labels: Optional[Sequence[str]] = None) -> str:
    """Markdown: one row per setting, its median time, spread, and speed-up over the first."""
    from mue.evaluation.records import format_thresholds

    lines = ["| setting | thresholds | median time (s) | times (s) | speed-up, median [min, max] |",
             "|---|---|---|---|---|"]
    for i, row in enumerate(result["settings"]):
        label = labels[i] if labels else ("baseline" if i == 0 else f"setting {i}")
        times = ", ".join(f"{t:.2f}" for t in row["seconds"])
        lines.append(f"| {label} | {format_thresholds(row['thresholds'])} | {row['median_s']:.2f} | {times} | "
                     f"{row['speedup']:.2f}x [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}] |")
    lines.append(f"\n{result['n_examples']} {result['task']} examples in batches of {result['batch_size']}, "
                 f"{result['repeats']} timed rounds after a warm-up batch, the settings in rotating order, the "
                 f"model loaded once ({result.get('device', 'cpu')}, {result['threads']} threads). A speed-up is a ratio of two timings of "
                 "the same round; [min, max] is its spread over the rounds.")
    return "\n".join(lines)


def write(result: dict, path: str, labels: Optional[Sequence[str]] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**result, "labels": list(labels) if labels else None}, f, indent=1)


def section(timing_dir: str) -> Dict[str, str]:
    """{title: markdown} with one table per timed task (TIMING_DIR/*.json), or {} when there is none."""
    if not os.path.isdir(timing_dir):
        return {}
    parts = []
    for name in sorted(os.listdir(timing_dir)):
        if name.endswith(".json"):
            with open(os.path.join(timing_dir, name), encoding="utf-8") as f:
                result = json.load(f)
            parts += [f"### {result['task']}", timing_table(result, result.get("labels"))]
    return {SECTION_TITLE: "\n\n".join(parts)} if parts else {}


def parse_setting(text: str) -> Dict[str, float]:
    """"0.99,0.95,0.9" -> the image, text and decoder thresholds (mue.evaluation.sweep's parser)."""
    from mue.evaluation import sweep
    from mue.exiting.config import THRESHOLD_KNOBS

    try:
        return dict(zip(THRESHOLD_KNOBS, sweep.parse_setting(text)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_knob(text: str):
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--knob takes NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        return name, value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mue.benchmarks.timed_settings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="OFA TSV file of the checkpoint's task (caption or SNLI-VE)")
    p.add_argument("--setting", type=parse_setting, action="append", required=True,
                   help="IMG,TXT,DEC thresholds; give it once per setting, the baseline (e.g. 1,1,1) first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up batch per setting)")
    p.add_argument("--max-examples", type=int, help="time the first N examples (default all)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--knob", type=parse_knob, action="append", default=[],
                   help="an exit knob shared by all settings, NAME=VALUE (e.g. dec_schedule=decay)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    start = time.time()
    result = time_settings(args.checkpoint, args.data, args.setting, args.repeats, args.max_examples,
                           args.batch_size, dict(args.knob), device=args.device)
    if args.json:
        write(result, args.json)
    print(timing_table(result))
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
