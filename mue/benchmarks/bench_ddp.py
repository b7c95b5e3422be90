#!/usr/bin/env python
"""Training-step cost of DistributedDataParallel with and without find_unused_parameters (CPU, gloo).

mue_ofa's image-generation parameters (mue.models.mue_ofa.UNUSED_PARAMETERS) get no gradient in any mue
task; they do not require one, so plain DDP works. fairseq's --find-unused-parameters
(DDP's find_unused_parameters=True) still works and makes DDP traverse the autograd graph after every
forward to find parameters without a gradient. This times one training step (criterion `mue` forward +
backward, with DDP's gradient all-reduce; no optimizer) on N CPU processes, each with its own random batch,
both ways, in alternating rounds within the same N fresh processes; rank 0's median step time is
reported, with the ratio find_unused / plain.

    python scripts/bench_ddp.py                                   # 2 processes, micro, 1 thread each
    python scripts/bench_ddp.py --sizes micro,base --steps 5 --json out.json
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from mue.benchmarks import child_env
from mue.benchmarks.bench_inference import ARCHS, machine_info, markdown_table, parse_list, per_size, print_header

MODES = {"plain": False, "find_unused": True}  # mode -> DistributedDataParallel(find_unused_parameters=...)
RESULT_PREFIX = "BENCH_DDP_RESULT "
COLUMNS = ("size", "processes", "find_unused_parameters", "batch", "src_len", "tgt_len", "image", "step_s",
           "time_ratio")


def random_batch(dictionary, bsz, src_len, tgt_len, image_size, seed):
    """A full-length batch in the collater's layout: random tokens (bos ... eos) and images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    low, high = dictionary.nspecial, min(len(dictionary), 50000)
    src = torch.randint(low, high, (bsz, src_len), generator=gen)
    src[:, 0], src[:, -1] = dictionary.bos(), dictionary.eos()
    target = torch.randint(low, high, (bsz, tgt_len), generator=gen)
    target[:, -1] = dictionary.eos()
    prev = torch.cat([torch.full((bsz, 1), dictionary.bos()), target[:, :-1]], 1)
    net_input = {"src_tokens": src, "src_lengths": torch.full((bsz,), src_len),
                 "patch_images": torch.rand(bsz, 3, image_size, image_size, generator=gen) * 2 - 1,
                 "patch_masks": torch.ones(bsz, dtype=torch.bool), "prev_output_tokens": prev}
    return {"id": torch.arange(bsz), "net_input": net_input, "target": target, "ntokens": bsz * tgt_len,
            "nsentences": bsz}


def run_rank(size, args) -> list:
    """One rank: both configurations, in --rounds alternating rounds (so that a change of machine load
    hits both alike); RANK, WORLD_SIZE, MASTER_ADDR/PORT come from `spawn`."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import mue  # noqa: F401  (registers model and criterion)
    from mue.criterions.mue import MueCriterion, MueCriterionConfig
    from mue.models import build_arch

    class FairseqLikeDDP(DistributedDataParallel):
        """DDP that hands attribute look-ups on to the model (`model.decoder`), as fairseq's wrapper does."""

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)
    model = build_arch(ARCHS[size], dictionary=None).train()
    dictionary = model.decoder.dictionary
    sample = random_batch(dictionary, args.batch_size[size], args.src_len, args.tgt_len, args.image_size[size],
                          args.seed + rank)  # each rank its own batch, as in data-parallel training
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    criterion = MueCriterion.build_criterion(MueCriterionConfig(label_smoothing=0.1), task)
    times = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]):
            ddp = FairseqLikeDDP(model, find_unused_parameters=MODES[mode])
            for step in range(args.warmup + args.steps):
                ddp.zero_grad(set_to_none=True)
                dist.barrier()
                start = time.perf_counter()
                loss, _, _ = criterion(ddp, sample)
                loss.backward()  # the gradient all-reduce runs during the backward
                if step >= args.warmup:
                    times[mode].append(time.perf_counter() - start)
            dist.barrier()
            del ddp, loss  # the reducer removes its gradient hooks when it goes
            gc.collect()
    dist.destroy_process_group()
    return [{"size": size, "processes": args.processes, "find_unused_parameters": MODES[mode],
             "batch": args.batch_size[size], "src_len": args.src_len, "tgt_len": args.tgt_len,
             "image": args.image_size[size], "step_s": statistics.median(times[mode]), "step_times_s": times[mode]}
            for mode in MODES]


def spawn(size, args, argv) -> list:
    """Run both configurations of one size on args.processes fresh interpreters; returns rank 0's rows."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(args.processes):
        env = child_env(dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.processes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port)))
        cmd = [sys.executable, "-m", "mue.benchmarks.bench_ddp", *argv, "--worker", size]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate() for p in procs]
    lines = [line for line in outputs[0][0].splitlines() if line.startswith(RESULT_PREFIX)]
    if any(p.returncode for p in procs) or not lines:
        errors = "\n".join(err[-2000:] for _, err in outputs)
        raise SystemExit(f"bench_ddp: {size} failed:\n{errors}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2, help="DDP processes (default %(default)s)")
    p.add_argument("--sizes", default="micro", help="comma list of: " + ",".join(ARCHS) + " (default %(default)s)")
    p.add_argument("--batch-size", default="8", help="per process: one number or SIZE=N (default %(default)s)")
    p.add_argument("--src-len", type=int, default=20, help="text tokens in the encoder (bos ... eos)")
    p.add_argument("--tgt-len", type=int, default=20, help="target tokens (eos included)")
    p.add_argument("--image-size", default="micro=64,base=128", help="pixels, one number or SIZE=N")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and configuration")
    p.add_argument("--rounds", type=int, default=4, help="rounds, each timing both configurations in "
                                                         "alternating order (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and machine info as JSON")
    p.add_argument("--worker", metavar="SIZE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = parse_list(args.sizes, str, "--sizes", ARCHS)
    args.batch_size = per_size(args.batch_size, args.sizes, int, "--batch-size")
    args.image_size = per_size(args.image_size, args.sizes, int, "--image-size")
    if (args.processes < 2 or args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.src_len < 3
            or args.tgt_len < 1):
        raise SystemExit("bench_ddp: needs --processes >= 2, --steps >= 1, --rounds >= 1, --warmup >= 0, "
                         "--src-len >= 3, --tgt-len >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker not in args.sizes:
            raise SystemExit(f"--worker: bad size '{args.worker}'")
        result = run_rank(args.worker, args)
        if os.environ.get("RANK") == "0":
            print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    info = machine_info()
    notes = [
        f"DistributedDataParallel over {args.processes} CPU processes (gloo), {args.threads} intra-op thread(s) "
        "each; random-weight models with OFA's 59,457-entry vocabulary; criterion `mue` (all layers)",
        "one step = forward + backward with the gradient all-reduce (no optimizer); each rank its own batch",
        "plain: the unused image-generation parameters have requires_grad=False (mue_ofa's default); "
        "find_unused: the same model with find_unused_parameters=True (fairseq --find-unused-parameters)",
        "batch per process: " + ", ".join(f"{s} {args.batch_size[s]} x (src {args.src_len}, tgt {args.tgt_len}, "
                                          f"{args.image_size[s]}px)" for s in args.sizes),
        f"step_s: rank 0's median over {args.rounds} rounds of {args.steps} step(s) (after {args.warmup} warm-up "
        "step(s) each); the rounds alternate the two configurations in the same processes",
    ]
    print_header("MuE DDP training-step benchmark", info, notes)
    worker_argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        plain, find_unused = spawn(size, args, worker_argv)
        plain["time_ratio"], find_unused["time_ratio"] = 1.0, find_unused["step_s"] / plain["step_s"]
        rows += [plain, find_unused]
        print(f"<!-- done {size} after {time.perf_counter() - started:.0f}s -->", flush=True)
    total = time.perf_counter() - started
    print()
    print(markdown_table(rows, COLUMNS, {"step_s": ".3f", "time_ratio": ".3f"}))
    print(f"\ntotal benchmark time {total:.0f}s; load average (1 min) at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "notes": notes, "columns": list(COLUMNS), "rows": rows, "total_s": total},
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
