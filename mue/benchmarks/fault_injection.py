#!/usr/bin/env python
"""Kill a small fairseq-train run at random moments, resume it each time, and check that it ends exactly
where an uninterrupted run ends.

What it does: trains a reference run without interruption; then starts the same run in another folder and
SIGKILLs it --kills times, restarting the same command after each kill (fairseq-train resumes from
checkpoint_last.pt). Each kill is one of
  - `write`: while a checkpoint file is being written by this start (a file in the save folder, modified
    since the start, still smaller than a complete checkpoint), 0-5 ms after the first or the second such
    write of the drawn kind begins: the interval checkpoint checkpoint_E_U.pt(.tmp), checkpoint_best.pt(.tmp)
    or checkpoint_last.pt(.tmp) (fairseq's copies or, at an epoch's end, the save itself);
  - `random`: at a uniformly random moment (a training step, validation or a save) in the first half of
    the training the start has left, counted from its first logged update.
Then the run is started once more and left to finish. Checked: every restart runs (no damaged checkpoint
stops it) and the final checkpoint_last.pt holds the same parameters, Adam state, update count and data
position as the reference's, tensor for tensor, bit for bit. Exit status 0 when identical.

    python scripts/fault_injection.py                     # 8 kills, mue_ofa_micro, 24 updates
    python scripts/fault_injection.py --kills 10 --seed 3 --keep /tmp/fi
    python scripts/fault_injection.py --without-patch     # fairseq's plain checkpoint copies, for comparison

`--without-patch` runs fairseq-train with mue.compat's crash-safe checkpoints undone (section 8), to show
what the patch prevents: a kill during the copy to checkpoint_last.pt leaves a truncated file, on which
fairseq's resume stops. Synthetic SNLI-VE data (4 images, 12 rows); one intra-op thread per run.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from mue.benchmarks import child_env

#: starts fairseq-train in a fresh interpreter; argv[1] says whether to undo mue's checkpoint patches
LAUNCHER = """
import sys
import mue
if sys.argv.pop(1) == "unpatched":
    from fairseq import checkpoint_utils
    from mue import compat
    for name in ("PathManager", "torch_persistent_save", "load_checkpoint", "load_checkpoint_to_cpu"):
        setattr(checkpoint_utils, name, compat.ORIGINALS["fairseq.checkpoint_utils." + name])
from fairseq_cli.train import cli_main
sys.argv[0] = "fairseq-train"
cli_main()
"""
UPDATE = re.compile(r"num_updates=(\d+)")
LOADED = re.compile(r"Loaded checkpoint .* @ (\d+) updates\)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs before the run may finish (default %(default)s; "
                                                        "fewer when the run finishes first)")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill schedule (training uses seed 1)")
    p.add_argument("--arch", default="mue_ofa_micro", help="model (default %(default)s; its checkpoint with "
                                                          "Adam state is ~70 MB, so a write takes a while)")
    p.add_argument("--max-update", type=int, default=24, help="updates (3 per epoch; default %(default)s)")
    p.add_argument("--save-interval-updates", type=int, default=2, help="default %(default)s")
    p.add_argument("--without-patch", action="store_true", help="undo mue.compat's crash-safe checkpoints")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="also write the kills and the result as JSON")
    return p.parse_args(argv)


def train_command(data, save_dir, args):
    return [sys.executable, "-c", LAUNCHER, "unpatched" if args.without_patch else "patched",
            os.path.join(data, "snli_ve"), "--task", "mue_snli_ve", "--arch", args.arch,
            "--patch-image-size", "32", "--num-codes", "0", "--num-bins", "0",
            "--criterion", "mue", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "polynomial_decay",
            "--warmup-updates", "2", "--total-num-update", str(args.max_update), "--batch-size", "4",
            "--required-batch-size-multiple", "1", "--max-update", str(args.max_update),
            "--save-interval-updates", str(args.save_interval_updates), "--no-epoch-checkpoints",
            "--save-dir", save_dir, "--seed", "1", "--cpu", "--num-workers", "0",
            "--log-format", "simple", "--log-interval", "1"]


def writes_in_progress(save_dir, since_ns, full_size):
    """Files in save_dir modified since `since_ns` and smaller than a complete checkpoint (`full_size`
    bytes): the checkpoint writes of the current start that have not finished."""
    found = []
    try:
        with os.scandir(save_dir) as entries:
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:  # renamed away meanwhile
                    continue
                if entry.name.startswith("checkpoint") and st.st_mtime_ns >= since_ns and st.st_size < full_size:
                    found.append(entry.name)
    except FileNotFoundError:
        pass
    return found


def is_last_or_best(name: str) -> bool:
    return name.startswith(("checkpoint_last", "checkpoint_best"))


def last_update(log_path) -> int:
    with open(log_path, errors="replace") as f:
        numbers = UPDATE.findall(f.read())
    return int(numbers[-1]) if numbers else 0


def last_line(log_path) -> str:
    """The last non-blank line of a log, cut to 200 characters (the error that ended a failed start)."""
    with open(log_path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "?"


def start(cmd, log_path, env):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(env)), log


def first_update_logged(log_path) -> bool:
    with open(log_path, errors="replace") as f:
        return UPDATE.search(f.read()) is not None


def resumed_at(log_path) -> int:
    """The update count of the checkpoint this start loaded (0 for a fresh start)."""
    with open(log_path, errors="replace") as f:
        found = LOADED.search(f.read())
    return int(found.group(1)) if found else 0


def run_to_end(cmd, log_path, env):
    """Run cmd to its end; returns (exit status, seconds from the first logged update to the end)."""
    proc, log = start(cmd, log_path, env)
    training_began = None
    while proc.poll() is None:
        if training_began is None and first_update_logged(log_path):
            training_began = time.monotonic()
        time.sleep(0.05)
    log.close()
    return proc.returncode, time.monotonic() - (training_began or time.monotonic())


def run_and_kill(cmd, log_path, env, save_dir, mode, rng, train_span, full_size, max_update):
    """Start cmd and SIGKILL it per `mode`; returns (record of the kill, None), or (None, exit status) when
    the run ended before the kill. `random`: a uniform moment of the first half of the training this start
    has left (the reference's training time, times the share of updates left after the checkpoint it
    loaded), counted from its first logged update (start-up, which only reads, is left out). `write`: the first or second
    write of the drawn file kind that this start begins."""
    began_ns = time.time_ns()
    began = time.monotonic()
    proc, log = start(cmd, log_path, env)
    share = rng.random()
    target = rng.choice(["checkpoint_E_U", "checkpoint_best", "checkpoint_last"]) if mode == "write" else None
    nth = rng.choice([1, 2]) if mode == "write" else None
    deadline, next_look, seen, writes, writing = None, 0.0, set(), 0, []
    try:
        while proc.poll() is None:
            if mode == "random":
                if deadline is None and time.monotonic() >= next_look:  # the log is read every 20 ms
                    next_look = time.monotonic() + 0.02
                    if first_update_logged(log_path):
                        left = max(max_update - resumed_at(log_path), 0) / max_update
                        deadline = time.monotonic() + share * left * train_span / 2
                if deadline is not None and time.monotonic() >= deadline:
                    writing = writes_in_progress(save_dir, began_ns, full_size)
                    break
            else:
                now = {n for n in writes_in_progress(save_dir, began_ns, full_size)
                       if (n.startswith(target) if target != "checkpoint_E_U" else not is_last_or_best(n))}
                writes += len(now - seen)  # writes that began since the last look
                seen = now
                if now and writes >= nth:
                    time.sleep(rng.uniform(0, 0.005))
                    writing = writes_in_progress(save_dir, began_ns, full_size) or sorted(now)
                    break
            time.sleep(0.001)
        if proc.poll() is not None:
            return None, proc.returncode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        log.close()
    what = "random" if mode == "random" else f"write #{nth} ({target})"
    return {"mode": what, "after_s": round(time.monotonic() - began, 2), "last_logged_update": last_update(log_path),
            "being_written": sorted(set(writing))}, None


def tensors_equal(a, b, path="", diffs=None, counter=None):
    """Compare nested checkpoint contents; collect differing paths in `diffs`, count tensors in counter[0]."""
    import torch

    diffs = [] if diffs is None else diffs
    counter = [0] if counter is None else counter
    if torch.is_tensor(a) or torch.is_tensor(b):
        counter[0] += 1
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)):
            diffs.append(path)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            diffs.append(f"{path} (keys)")
        for k in a.keys() & b.keys():
            tensors_equal(a[k], b[k], f"{path}/{k}", diffs, counter)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{path} (length)")
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{path}[{i}]", diffs, counter)
    elif a != b:
        diffs.append(path)
    return diffs, counter[0]


def compare(reference_path, faulty_path):
    import torch

    import mue  # noqa: F401  (allow-list for weights-only loading)

    ref = torch.load(reference_path, map_location="cpu")
    got = torch.load(faulty_path, map_location="cpu")
    parts = {
        "model": (ref["model"], got["model"]),
        "optimizer": (ref["last_optimizer_state"], got["last_optimizer_state"]),
        "num_updates": (ref["optimizer_history"][-1]["num_updates"], got["optimizer_history"][-1]["num_updates"]),
        "data position": (ref["extra_state"]["train_iterator"], got["extra_state"]["train_iterator"]),
    }
    result = {}
    for name, (a, b) in parts.items():
        diffs, n = tensors_equal(a, b)
        result[name] = {"identical": not diffs, "tensors": n, "differing": diffs[:5]}
    return result


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = args.keep or tempfile.mkdtemp(prefix="mue_fault_injection_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, "snli_ve")):
        from mue.data.synthetic import generate

        generate(data, num_train=4, num_valid=1, num_test=1, image_size=32)
    reference_dir, faulty_dir = os.path.join(work, "reference"), os.path.join(work, "faulty")
    for d in (reference_dir, faulty_dir):
        shutil.rmtree(d, ignore_errors=True)
    for name in os.listdir(work):
        if name.endswith(".log"):
            os.remove(os.path.join(work, name))
    print(f"fault injection: {args.arch}, {args.max_update} updates, a checkpoint every "
          f"{args.save_interval_updates}, {args.kills} SIGKILLs (kill seed {args.seed})"
          + (", WITHOUT mue's crash-safe checkpoints" if args.without_patch else "") + f"; work dir {work}",
          flush=True)

    t0 = time.monotonic()
    code, train_span = run_to_end(train_command(data, reference_dir, args), os.path.join(work, "reference.log"), env)
    duration = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}); see {work}/reference.log")
    full_size = os.path.getsize(os.path.join(reference_dir, "checkpoint_last.pt"))
    print(f"reference run: {duration:.1f}s ({train_span:.1f}s from the first update), checkpoints of "
          f"{full_size / 2**20:.0f} MiB", flush=True)

    cmd = train_command(data, faulty_dir, args)
    kills, starts, failed_starts = [], 0, []
    modes = [("write" if i % 2 == 0 else "random") for i in range(args.kills)]
    rng.shuffle(modes)
    for mode in modes:
        starts += 1
        log_path = os.path.join(work, f"faulty_start{starts}.log")
        record, code = run_and_kill(cmd, log_path, env, faulty_dir, mode, rng, train_span, full_size,
                                    args.max_update)
        if record is None:  # finished, or failed, before the kill
            if code != 0:
                failed_starts.append({"start": starts, "error": last_line(log_path)})
                print(f"start {starts} FAILED: {failed_starts[-1]['error']}", flush=True)
            break
        kills.append(record)
        print(f"kill {len(kills)}: {record['mode']:<27} after {record['after_s']:5.2f}s, last logged update "
              f"{record['last_logged_update']:>2}, being written: {', '.join(record['being_written']) or '-'}",
              flush=True)
    ended = False
    for _ in range(3):  # the final start; again if it stopped (it should not)
        starts += 1
        log_path = os.path.join(work, f"faulty_start{starts}.log")
        if run_to_end(cmd, log_path, env)[0] == 0:
            ended = True
            break
        failed_starts.append({"start": starts, "error": last_line(log_path)})
        print(f"start {starts} FAILED: {failed_starts[-1]['error']}", flush=True)
    fallbacks = finished_already = 0
    for i in range(1, starts + 1):
        with open(os.path.join(work, f"faulty_start{i}.log"), errors="replace") as f:
            text = f.read()
        fallbacks += text.count("is damaged")
        finished_already += "nothing left to train" in text

    result = {"kills": kills, "starts": starts, "failed_starts": failed_starts, "damaged_file_fallbacks": fallbacks,
              "reference_s": round(duration, 1), "reference_training_s": round(train_span, 1),
              "starts_that_found_the_run_finished": finished_already}
    if ended:
        result["comparison"] = compare(os.path.join(reference_dir, "checkpoint_last.pt"),
                                       os.path.join(faulty_dir, "checkpoint_last.pt"))
    identical = ended and all(part["identical"] for part in result["comparison"].values())
    result["identical"] = identical
    print()
    print(f"{len(kills)} kills ({sum(bool(k['being_written']) for k in kills)} while a checkpoint file was being "
          f"written), "
          f"{starts} starts, {len(failed_starts)} failed starts, {fallbacks} resumes from a fallback checkpoint, "
          f"{finished_already} starts that found the run finished")
    if ended:
        for name, part in result["comparison"].items():
            print(f"  {name:<13} {'identical' if part['identical'] else 'DIFFERENT: ' + ', '.join(part['differing'])}"
                  + (f" ({part['tensors']} tensors)" if part["tensors"] else ""))
    print("RESULT: " + ("final checkpoint bit-identical to the uninterrupted run" if identical else
                        "the interrupted run did NOT end like the uninterrupted one"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
