#!/usr/bin/env python
"""Training-step cost of MuE's layer-wise loss against the plain last-layer loss (CPU).

For each size (random-weight mue_ofa with OFA's 59,457-entry vocabulary) it times one training step
(forward + backward, no optimizer) of criterion `mue` over all decoder layers and of `mue` with
--last-layer-only (plain label-smoothed CE) on the same batch; `--modes` can add `mue_drop_worst`
(`mue` with --drop-worst-ratio in force). Each configuration lives in its own worker process, so its
peak RSS (VmHWM, counted from the end of the build) is its own, and the workers take turns step by
step: round after round, each configuration runs one step, in alternating order, so that load from
other processes on a shared machine hits all configurations alike. Step time is the median over
--steps rounds (after --warmup rounds), with its spread (min-max); `time_ratio` is the ratio of the
medians, `paired_ratio` the median of the per-round ratios. A step's working memory is the worker's
peak RSS minus its RSS after building model, criterion and batch. Goals at base size (issue 15): time
ratio <= 1.6x at 128 px and <= 1.1x at 480 px, working-memory ratio <= 1.1x.

    python scripts/bench_train.py                                     # micro (64 px) and base (128 px)
    python scripts/bench_train.py --sizes base --image-size base=480  # OFA's own image size
    python scripts/bench_train.py --quick --json out.json
"""
import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from mue.benchmarks import child_env
from mue.benchmarks.bench_inference import ARCHS, machine_info, markdown_table, parse_list, per_size, print_header

MODES = ("mue", "last_layer", "mue_drop_worst")
BASELINE = "last_layer"
TIME_GOALS, MEMORY_GOAL, GOAL_SIZE = {128: 1.6, 480: 1.1}, 1.10, "base"  # time goal per image size (px)
COLUMNS = ("size", "criterion", "batch", "src_len", "tgt_len", "image", "step_s", "spread", "rss_build_mb",
           "peak_rss_mb", "step_mem_mb", "time_ratio", "paired_ratio", "mem_ratio", "peak_ratio", "goal")


def rss_now_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) so that the peak is the steps', not the build's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_mb() -> float:
    """Peak RSS: VmHWM (since reset_peak), else getrusage's ru_maxrss (since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that an idle worker does not sit on
    its last step's peak while the other one runs (two 480 px workers would not fit in 24 GB otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def send(obj) -> None:
    """Worker -> coordinator: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_worker(size, mode, args) -> None:
    """Build, report RSS, then run one step per 'step' line on stdin; 'done' reports the peak and exits."""
    import mue  # noqa: F401  (registers model and criterion)
    from mue.criterions.mue import MueCriterion, MueCriterionConfig
    from mue.models import build_arch

    torch.manual_seed(args.seed)
    model = build_arch(ARCHS[size], dictionary=None).train()
    dictionary = model.decoder.dictionary
    sample = make_batch(dictionary, args.batch_size[size], args.src_len, args.tgt_len, args.image_size[size], args.seed)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    drop = args.drop_worst_ratio if mode == "mue_drop_worst" else 0.0
    cfg = MueCriterionConfig(label_smoothing=args.label_smoothing, last_layer_only=mode == BASELINE,
                             drop_worst_ratio=drop, drop_worst_after=0)
    criterion = MueCriterion.build_criterion(cfg, task)
    criterion.set_num_updates(1)  # past --drop-worst-after 0: drop-worst in force when configured
    gc.collect()
    rss_build = rss_now_mb()
    peak_reset = reset_peak()
    send({"ready": True, "rss_build_mb": rss_build})
    loss = None
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)  # an idle worker holds no gradients while the other one runs
        release_free_memory()
        send({"step_s": elapsed, "rss_idle_mb": rss_now_mb()})
    peak = rss_peak_mb()
    send({"rss_build_mb": rss_build, "peak_rss_mb": peak, "step_mem_mb": peak - rss_build,
          "peak_since": "build" if peak_reset else "start", "loss": float(loss.detach()) if loss is not None else None})


class Worker:
    """One configuration in its own interpreter, driven line by line."""

    def __init__(self, size, mode, argv):
        self.size, self.mode = size, mode
        cmd = [sys.executable, "-m", "mue.benchmarks.bench_train", *argv, "--worker", f"{size}:{mode}"]
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker never blocks
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=child_env())
        self.times = []

    def receive(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.stderr.seek(0)
                raise SystemExit(f"bench_train: worker {self.size}:{self.mode} failed (exit "
                                 f"{self.proc.returncode}):\n{self.stderr.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def request(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def finish(self) -> dict:
        result = self.request("done")
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()
        return result


def bench_size(size, args, worker_argv, log) -> list:
    """All modes of one size, interleaved round by round; one row per mode."""
    workers = [Worker(size, mode, worker_argv) for mode in args.modes]
    for worker in workers:  # built one after the other: building is not timed
        worker.receive()
    for rnd in range(args.warmup + args.steps):
        order = workers if rnd % 2 == 0 else workers[::-1]
        this_round = {}
        for worker in order:
            reply = worker.request("step")
            this_round[worker.mode] = reply["step_s"]
            worker.rss_idle_mb = reply["rss_idle_mb"]
            if rnd >= args.warmup:
                worker.times.append(this_round[worker.mode])
        log(f"{size} round {rnd + 1}/{args.warmup + args.steps}{' (warm-up)' if rnd < args.warmup else ''}: "
            + ", ".join(f"{mode} {t:.2f}s" for mode, t in this_round.items()))
    rows = []
    for worker in workers:
        result = worker.finish()
        times = worker.times
        rows.append({"size": size, "criterion": worker.mode, "batch": args.batch_size[size], "src_len": args.src_len,
                     "tgt_len": args.tgt_len, "image": args.image_size[size], "step_s": statistics.median(times),
                     "step_min_s": min(times), "step_max_s": max(times),
                     "spread": f"{min(times):.2f}-{max(times):.2f}", "step_times_s": times,
                     "rss_idle_mb": worker.rss_idle_mb, **result})
    return rows


def add_ratios(rows):
    """On each non-baseline row: time and memory ratios over its size's `last_layer` row, with the goals."""
    by_key = {(r["size"], r["criterion"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["size"], BASELINE))
        if row["criterion"] == BASELINE or base is None:
            continue
        row["time_ratio"] = row["step_s"] / base["step_s"]
        row["paired_ratio"] = statistics.median(a / b for a, b in zip(row["step_times_s"], base["step_times_s"]))
        row["mem_ratio"] = row["step_mem_mb"] / base["step_mem_mb"] if base["step_mem_mb"] > 0 else None
        row["peak_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        time_goal = TIME_GOALS.get(row["image"])
        if row["size"] != GOAL_SIZE or row["criterion"] != "mue":
            row["goal"] = f"(goals apply to mue at {GOAL_SIZE})"
            continue
        mem_ok = row["mem_ratio"] is not None and row["mem_ratio"] <= MEMORY_GOAL
        parts = [f"memory <= {MEMORY_GOAL}x: {'met' if mem_ok else 'MISSED'}"]
        met = mem_ok
        if time_goal is not None:
            time_ok = row["time_ratio"] <= time_goal
            parts.insert(0, f"time <= {time_goal}x: {'met' if time_ok else 'MISSED'}")
            met = met and time_ok
        else:
            parts.insert(0, f"(no time goal at {row['image']} px)")
        row["goal"] = "; ".join(parts)
        row["goal_met"] = met


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="micro,base", help="comma list of: " + ",".join(ARCHS))
    p.add_argument("--modes", default="mue,last_layer",
                   help=f"comma list of: {','.join(MODES)} (default %(default)s; ratios are over {BASELINE})")
    p.add_argument("--batch-size", default="8", help="one number or SIZE=N per size (default %(default)s)")
    p.add_argument("--src-len", type=int, default=20, help="text tokens in the encoder (bos ... eos)")
    p.add_argument("--tgt-len", type=int, default=20, help="target tokens (eos included)")
    p.add_argument("--image-size", default="micro=64,base=128",
                   help="pixels (square), one number or SIZE=N per size (default %(default)s; OFA trains at "
                        "480, smaller here so a CPU step takes seconds)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-worst-ratio", type=float, default=0.2,
                   help="the ratio of mode mue_drop_worst (default %(default)s, OFA caption stage 1)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
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
    args.modes = parse_list(args.modes, str, "--modes", MODES)
    if len(set(args.modes)) != len(args.modes):
        raise SystemExit(f"--modes: a mode is listed twice in {args.modes}")
    args.batch_size = per_size(args.batch_size, args.sizes, int, "--batch-size")
    args.image_size = per_size(args.image_size, args.sizes, int, "--image-size")
    for name in ("src_len", "tgt_len", "steps"):
        if getattr(args, name) < (3 if name == "src_len" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.warmup < 0 or any(b < 1 for b in args.batch_size.values()):
        raise SystemExit("--warmup must be >= 0 and every --batch-size >= 1")
    if not 0.0 < args.drop_worst_ratio < 1.0:
        raise SystemExit(f"--drop-worst-ratio must lie in (0, 1), got {args.drop_worst_ratio}")
    return args


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        size, _, mode = args.worker.partition(":")
        if size not in args.sizes or mode not in MODES:
            raise SystemExit(f"--worker: bad configuration '{args.worker}'")
        run_worker(size, mode, args)
        return
    info = machine_info()
    notes = [
        f"random-weight models (seed {args.seed}) with OFA's 59,457-entry vocabulary (placeholder dictionary), "
        f"train mode (arch dropout), fp32; label smoothing {args.label_smoothing}",
        "one step = criterion forward + loss.backward() (no optimizer); criterion `mue` over all decoder layers "
        f"vs `mue --last-layer-only` (plain CE on the last layer)"
        + (f"; mue_drop_worst = `mue --drop-worst-ratio {args.drop_worst_ratio}` in force"
           if "mue_drop_worst" in args.modes else ""),
        "batch per size: " + ", ".join(f"{s} {args.batch_size[s]} x (src {args.src_len}, tgt {args.tgt_len}, "
                                       f"{args.image_size[s]}px)" for s in args.sizes),
        f"each configuration in its own worker process; the workers take turns step by step, {args.warmup} "
        f"warm-up round(s) then {args.steps} timed round(s), the order alternating per round; step_s: median, "
        "spread: min-max",
        "time_ratio: median / median of last_layer; paired_ratio: median over rounds of the same round's ratio",
        "rss_build_mb: RSS after building model, criterion and batch; peak_rss_mb: the peak RSS of the steps "
        "(VmHWM, reset after the build; ru_maxrss where that cannot be reset); step_mem_mb = peak - rss_build "
        "(the step's working memory, gradients included); mem_ratio and peak_ratio compare these with last_layer",
        f"goals at {GOAL_SIZE} (mue): time ratio <= "
        + ", ".join(f"{g}x at {px} px" for px, g in TIME_GOALS.items())
        + f"; memory ratio (step_mem) <= {MEMORY_GOAL}x",
    ]
    print_header("MuE training-step benchmark", info, notes)
    worker_argv = without_json(argv)
    started = time.perf_counter()

    def log(text):
        print(f"<!-- {text}; {time.perf_counter() - started:.0f}s -->", flush=True)

    rows = []
    for size in args.sizes:
        rows.extend(bench_size(size, args, worker_argv, log))
    add_ratios(rows)
    total = time.perf_counter() - started
    print()
    print(markdown_table(rows, COLUMNS, {"step_s": ".3f", "rss_build_mb": ".0f", "peak_rss_mb": ".0f",
                                         "step_mem_mb": ".0f", "time_ratio": ".2f", "paired_ratio": ".2f",
                                         "mem_ratio": ".2f", "peak_ratio": ".2f"}))
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
