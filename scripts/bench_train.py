#!/usr/bin/env python
"""Training-step cost of MuE's layer-wise loss against the plain last-layer loss (CPU).

For each size (random-weight mue_ofa with OFA's 59,457-entry vocabulary) it runs one training step
(forward + backward, no optimizer) of criterion `mue` over all decoder layers and of `mue` with
--last-layer-only (plain label-smoothed CE) on the same batch. Every configuration runs in a fresh
subprocess so its peak RSS (getrusage ru_maxrss) is its own; the step's working memory is that peak
minus the RSS after building the model, criterion and batch. Step time is the median of --steps
steps after --warmup steps. Ratios mue / last-layer are printed with the goals (at base size:
time <= 1.25x, memory <= 1.3x).

    python scripts/bench_train.py                    # micro and base
    python scripts/bench_train.py --quick --json out.json
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from bench_inference import ARCHS, machine_info, markdown_table, parse_list, per_size, print_header

MODES = {"mue": False, "last_layer": True}  # mode -> MueCriterionConfig.last_layer_only
TIME_GOAL, MEMORY_GOAL, GOAL_SIZE = 1.25, 1.30, "base"
RESULT_PREFIX = "BENCH_TRAIN_RESULT "
COLUMNS = ("size", "criterion", "batch", "src_len", "tgt_len", "image", "step_s", "rss_build_mb", "peak_rss_mb",
           "step_mem_mb", "time_ratio", "mem_ratio", "goal")


def rss_now_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_batch(dictionary, bsz, src_len, tgt_len, image_size, seed):
    """A full-length (no padding) batch as the collater makes it, random tokens and images."""
    gen = torch.Generator().manual_seed(seed)
    low, high = dictionary.nspecial, min(len(dictionary), 50000)  # BPE tokens of the placeholder dictionary
    src = torch.randint(low, high, (bsz, src_len), generator=gen)
    src[:, 0], src[:, -1] = dictionary.bos(), dictionary.eos()
    target = torch.randint(low, high, (bsz, tgt_len), generator=gen)
    target[:, -1] = dictionary.eos()
    prev = torch.cat([torch.full((bsz, 1), dictionary.bos()), target[:, :-1]], 1)
    return {
        "id": torch.arange(bsz),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((bsz,), src_len),
            "patch_images": torch.rand(bsz, 3, image_size, image_size, generator=gen) * 2 - 1,
            "patch_masks": torch.ones(bsz, dtype=torch.bool),
            "prev_output_tokens": prev,
        },
        "target": target,
        "ntokens": bsz * tgt_len,
        "nsentences": bsz,
    }


def run_worker(size, mode, args) -> dict:
    """Build, measure RSS, run the steps; all in this (fresh) process."""
    import mue  # noqa: F401  (registers model and criterion)
    from mue.criterions.mue import MueCriterion, MueCriterionConfig
    from mue.models import build_arch

    torch.manual_seed(args.seed)
    model = build_arch(ARCHS[size], dictionary=None).train()
    dictionary = model.decoder.dictionary
    sample = make_batch(dictionary, args.batch_size[size], args.src_len, args.tgt_len, args.image_size[size], args.seed)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    cfg = MueCriterionConfig(label_smoothing=args.label_smoothing, last_layer_only=MODES[mode])
    criterion = MueCriterion.build_criterion(cfg, task)
    gc.collect()
    rss_build, peak_build = rss_now_mb(), rss_peak_mb()
    times = []
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
    peak = rss_peak_mb()
    return {"size": size, "criterion": mode, "batch": args.batch_size[size], "src_len": args.src_len,
            "tgt_len": args.tgt_len, "image": args.image_size[size], "step_s": statistics.median(times),
            "step_times_s": times, "rss_build_mb": rss_build, "peak_build_mb": peak_build, "peak_rss_mb": peak,
            "step_mem_mb": peak - rss_build, "loss": float(loss.detach())}


def spawn_worker(size, mode, argv) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line carries the result."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", f"{size}:{mode}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_train: worker {size}:{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def without_json(argv):
    """The command line minus --json PATH / --json=PATH (workers report on stdout)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


def add_ratios(rows):
    """On each size's `mue` row: time and memory ratios over its `last_layer` row, with the goals."""
    by_key = {(r["size"], r["criterion"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["size"], "last_layer"))
        if row["criterion"] != "mue" or base is None:
            continue
        row["time_ratio"] = row["step_s"] / base["step_s"]
        row["mem_ratio"] = row["step_mem_mb"] / base["step_mem_mb"] if base["step_mem_mb"] > 0 else None
        if row["size"] == GOAL_SIZE:
            time_ok = row["time_ratio"] <= TIME_GOAL
            mem_ok = row["mem_ratio"] is not None and row["mem_ratio"] <= MEMORY_GOAL
            row["goal"] = (f"time <= {TIME_GOAL}x: {'met' if time_ok else 'MISSED'}; "
                           f"memory <= {MEMORY_GOAL}x: {'met' if mem_ok else 'MISSED'}")
            row["goal_met"] = time_ok and mem_ok
        else:
            row["goal"] = f"(goals apply at {GOAL_SIZE})"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="micro,base", help="comma list of: " + ",".join(ARCHS))
    p.add_argument("--batch-size", default="8", help="one number or SIZE=N per size (default %(default)s)")
    p.add_argument("--src-len", type=int, default=20, help="text tokens in the encoder (bos ... eos)")
    p.add_argument("--tgt-len", type=int, default=20, help="target tokens (eos included)")
    p.add_argument("--image-size", default="micro=64,base=128",
                   help="pixels (square), one number or SIZE=N per size (default %(default)s; OFA trains at "
                        "480, smaller here so a CPU step takes seconds)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0 (default) keeps torch's default (one per core)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and machine info as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test setting: micro only, batch 2, src 8, tgt 6, 32 px, 1 step")
    p.add_argument("--worker", metavar="SIZE:MODE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_size, args.src_len, args.tgt_len, args.image_size, args.steps = "micro", "2", 8, 6, "32", 1
    args.sizes = parse_list(args.sizes, str, "--sizes", ARCHS)
    args.batch_size = per_size(args.batch_size, args.sizes, int, "--batch-size")
    args.image_size = per_size(args.image_size, args.sizes, int, "--image-size")
    for name in ("src_len", "tgt_len", "steps"):
        if getattr(args, name) < (3 if name == "src_len" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.warmup < 0 or any(b < 1 for b in args.batch_size.values()):
        raise SystemExit("--warmup must be >= 0 and every --batch-size >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        size, _, mode = args.worker.partition(":")
        if size not in args.sizes or mode not in MODES:
            raise SystemExit(f"--worker: bad configuration '{args.worker}'")
        print(RESULT_PREFIX + json.dumps(run_worker(size, mode, args)), flush=True)
        return
    info = machine_info()
    notes = [
        f"random-weight models (seed {args.seed}) with OFA's 59,457-entry vocabulary (placeholder dictionary), "
        f"train mode (arch dropout), fp32; label smoothing {args.label_smoothing}",
        "one step = criterion forward + loss.backward() (no optimizer); criterion `mue` over all decoder layers "
        "vs `mue --last-layer-only` (plain CE on the last layer)",
        "batch per size: " + ", ".join(f"{s} {args.batch_size[s]} x (src {args.src_len}, tgt {args.tgt_len}, "
                                       f"{args.image_size[s]}px)" for s in args.sizes),
        f"step_s: median of {args.steps} step(s) after {args.warmup} warm-up step(s); each configuration in a "
        "fresh subprocess",
        "rss_build_mb: RSS after building model, criterion and batch; peak_rss_mb: ru_maxrss at the end; "
        "step_mem_mb = peak - rss_build (the step's working memory, gradients included)",
        f"goals at {GOAL_SIZE}: time ratio <= {TIME_GOAL}x, memory ratio (step_mem) <= {MEMORY_GOAL}x",
    ]
    print_header("MuE training-step benchmark", info, notes)
    worker_argv = without_json(argv)
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        for mode in MODES:
            rows.append(spawn_worker(size, mode, worker_argv))
            print(f"<!-- done {size} {mode} after {time.perf_counter() - started:.0f}s -->", flush=True)
    add_ratios(rows)
    total = time.perf_counter() - started
    print()
    print(markdown_table(rows, COLUMNS, {"step_s": ".3f", "rss_build_mb": ".0f", "peak_rss_mb": ".0f",
                                         "step_mem_mb": ".0f", "time_ratio": ".2f", "mem_ratio": ".2f"}))
    goals = [r for r in rows if "goal_met" in r]
    print(f"\ngoals met: {sum(r['goal_met'] for r in goals)} of {len(goals)}; total benchmark time {total:.0f}s; "
          f"load average (1 min) at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "notes": notes, "columns": list(COLUMNS), "rows": rows, "total_s": total},
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
