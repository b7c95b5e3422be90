#!/usr/bin/env python
"""Inference benchmark of MuE's early exits on random-weight mue_ofa models (CPU, or a GPU with --device cuda).

For each size x task x batch it times four configurations of the same model, all without exits unless
stated, interleaved round by round (so that load from other processes hits all alike):
  full_per_row  the layout fairseq's encoders give: every beam row (caption) or answer candidate (SNLI-VE)
                gets its own copy of its source's encoder states and so computes its own cross-attention
                keys/values; no exit code (fairseq's plain SequenceGenerator). This is the model as it
                ran before mue shared them ("today's full model" in the README's tables);
  full          the same model with one set of cross keys/values per source, read in place by its rows:
                exact (the same outputs), so it is a speed-up of the full model too;
  bookkeeping   the exit code path on (exit session, trace, accounting) with every threshold 1, so
                nothing exits: its cost over `full` is the price of the bookkeeping;
  mue           the cosine exit policy with the given thresholds.
It reports wall clock (median of --repeats timed rounds after one warm-up round, and the spread), the
layers actually run, FLOPs (mue.exiting.accounting), measured vs FLOP-predicted speedups against both
full models, host-device syncs per decoder step on the exit path (mue.exiting.syncs), and with --memory
the peak memory of one call per configuration (a fresh process each on the CPU).

Random weights rarely saturate, so the thresholds are chosen per size (--img/txt/dec-thres) to run about
half of each stack; the table shows the layers they really ran.

    python scripts/bench_inference.py                    # default: micro and base at 192 px
    python scripts/bench_inference.py --quick --json out.json
    python scripts/bench_inference.py --sizes base --image-size 480 --tasks caption --batch-sizes 1,16 --memory
    python scripts/bench_inference.py --device cuda --sizes base --image-size 480 --batch-sizes 1,16,64

On a GPU every timed call is bracketed by torch.cuda.synchronize(), so the times include the kernels'
work, not only their launch.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

import mue  # noqa: F401  (registers the model with fairseq, applies compat patches)
from mue.benchmarks import child_env
from fairseq.sequence_generator import SequenceGenerator
from mue.data.tokenizer import Tokenizer
from mue.exiting.accounting import account, model_sizes, new_stats
from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.exiting.syncs import SyncCounter
from mue.generation.generator import MueSequenceGenerator
from mue.models import build_arch

ARCHS = {"micro": "mue_ofa_micro", "base": "mue_ofa_base"}
TASKS = ("caption", "snli_ve")
CONFIGS = ("full_per_row", "full", "bookkeeping", "mue")
NEVER = {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0}
EFFICIENCY_GOAL = 0.85  # measured speedup / FLOP-predicted speedup of mue over full and full_per_row
OVERHEAD_GOAL = 0.03  # t_bookkeeping / t_full - 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# defaults, per size; random-weight similarities differ by width, hence per-size thresholds
DEFAULT_IMAGE_SIZE = "micro=64,base=192"  # base at 256px: ~12 min on 2 shared cores
DEFAULT_THRES = "micro=0.85,base=0.8"

CAPTION_PROMPT = " what does the image describe?"
SNLI_HYPOTHESES = (
    "two men are playing frisbee in a park",
    "a dog runs",
    "a woman in a red coat is waiting for the bus next to an old building",
    "children are sleeping",
)
SNLI_ANSWERS = (" yes", " no", " maybe")

COLUMNS = ("size", "task", "batch", "config", "time_s", "spread", "img_layers", "txt_layers", "dec_layers",
           "gflops", "speedup_measured", "speedup_flops", "efficiency", "vs_per_row_measured",
           "vs_per_row_flops", "vs_per_row_efficiency", "overhead", "syncs_per_step", "peak_mem_gb",
           "images_encoded", "per_pair_gflops", "per_pair_ms", "answers_as_per_row", "goal")


# ---------------------------------------------------------------- shared with bench_train.py
def per_size(text, sizes, kind, name):
    """'0.9' -> the same value for every size; 'micro=0.85,base=0.8' -> one per size.
    Every size asked for must get a value; errors name the option."""
    text = str(text).strip()
    if "=" not in text:
        try:
            return {s: kind(text) for s in sizes}
        except ValueError:
            raise SystemExit(f"{name}: '{text}' is not a {kind.__name__}") from None
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ARCHS:
            raise SystemExit(f"{name}: '{item}' is not SIZE=VALUE with SIZE in {sorted(ARCHS)}")
        try:
            values[key] = kind(value)
        except ValueError:
            raise SystemExit(f"{name}: '{value}' for {key} is not a {kind.__name__}") from None
    missing = [s for s in sizes if s not in values]
    if missing:
        raise SystemExit(f"{name}: no value for size(s) {missing} in '{text}'")
    return values


def parse_list(text, kind, name, allowed=None):
    """'1,16' -> [1, 16]; errors name the option and the bad item."""
    items = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = kind(item)
        except ValueError:
            raise SystemExit(f"{name}: '{item}' is not a {kind.__name__}") from None
        if allowed is not None and value not in allowed:
            raise SystemExit(f"{name}: '{item}' is not one of {list(allowed)}")
        items.append(value)
    if not items:
        raise SystemExit(f"{name}: empty list")
    return items


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu") -> dict:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {
        "device": device,
        "gpu": gpu,
        "command": shlex.join([sys.executable] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


def print_header(title, info, notes):
    print(f"# {title}\n")
    print(f"command: `{info['command']}`\n")
    gpu = f"GPU {info['gpu']}; " if info.get("gpu") else ""
    print(f"machine: {gpu}{info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']} with "
          f"{info['torch_threads']} threads, python {info['python']}, load average (1 min) "
          f"{info['load_average_1m']} at start\n")
    for note in notes:
        print(f"- {note}")
    print(flush=True)


def fmt(value, spec=".3f"):
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(rows, columns, formats=None) -> str:
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), formats.get(c, ".3f")) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs
def encode_rows(tokenizer, dictionary, texts, bsz):
    """Right-padded src_tokens [bos ... eos] for bsz rows cycling through texts, and their lengths."""
    rows = [tokenizer.encode(texts[i % len(texts)], dictionary, add_bos=True, add_eos=True) for i in range(bsz)]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((bsz, int(lengths.max())), dictionary.pad(), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens, lengths


def make_sample(task, bsz, image_size, dictionary, tokenizer, seed, device="cpu", dtype=torch.float32,
                per_image=1):
    """A batch as the collater makes it (random images, real prompt text), on `device`; `per_image`
    consecutive rows show the same image (SNLI-VE asks ~18 questions per image)."""
    gen = torch.Generator().manual_seed(seed)
    if task == "caption":
        texts = [CAPTION_PROMPT]
    else:
        texts = [f' does the image describe " {h} "?' for h in SNLI_HYPOTHESES]
    src_tokens, src_lengths = encode_rows(tokenizer, dictionary, texts, bsz)
    n_images = -(-bsz // per_image)
    images = (torch.rand(n_images, 3, image_size, image_size, generator=gen) * 2 - 1).to(dtype)  # mean=std=0.5
    images = images.repeat_interleave(per_image, 0)[:bsz]
    net_input = {
        "src_tokens": src_tokens,
        "src_lengths": src_lengths,
        "patch_images": images,
        "patch_masks": torch.ones(bsz, dtype=torch.bool),
        "prev_output_tokens": torch.full((bsz, 1), dictionary.bos(), dtype=torch.long),
    }
    net_input = {k: v.to(device) for k, v in net_input.items()}
    return {"id": torch.arange(bsz, device=device), "net_input": net_input, "target": None, "ntokens": 0,
            "nsentences": bsz}


def snli_candidates(bsz, dictionary, tokenizer):
    """prev_output_tokens [bos, answer] for the three answers of every row: (3 * bsz) x 2."""
    answers = []
    for text in SNLI_ANSWERS:
        ids = tokenizer.encode(text, dictionary)
        if ids.numel() != 1 or int(ids[0]) == dictionary.unk():
            raise ValueError(f"bench_inference: answer {text!r} is not one known BPE token in the dictionary")
        answers.append(int(ids[0]))
    answer = torch.tensor(answers).repeat(bsz)
    return torch.stack([torch.full_like(answer, dictionary.bos()), answer], 1)


# ---------------------------------------------------------------- one configuration
class Runner:
    """One configuration: caption (beam search) or snli_ve (one encoder pass, then the teacher-forced
    decoder over [bos, answer] for the 3 candidates of every row); `exits` None runs no exit code."""

    def __init__(self, model, dictionary, task, exits, share_sources, beam, max_len_b, candidates=None):
        self.model, self.task, self.exits, self.share = model, task, exits, share_sources
        self.candidates, self.sizes = candidates, model_sizes(model)
        if task == "caption":
            common = dict(beam_size=beam, max_len_b=max_len_b)
            self.generator = (SequenceGenerator([model], dictionary, **common) if exits is None else
                              MueSequenceGenerator([model], dictionary, exit_config=exits, **common))

    def __call__(self, sample):
        """Run once; returns the ExitStats of what ran (None without exit code)."""
        self.model.encoder.share_sources = self.share
        try:
            if self.task == "caption":
                if self.exits is not None:
                    self.generator.reset_stats()
                self.generator.generate([self.model], sample)
                return getattr(self.generator, "stats", None)
            if self.exits is None:
                self.answers = self._score(sample)
                return None
            with exit_session(self.model, self.exits) as settings:
                self.answers = self._score(sample)
            return account(new_stats(self.model), settings.trace, self.sizes)
        finally:
            self.model.encoder.share_sources = True

    def _score(self, sample):
        net = sample["net_input"]
        encoder_out = self.model.encoder(net["src_tokens"], net["src_lengths"], net["patch_images"], net["patch_masks"])
        rows = torch.arange(net["src_tokens"].size(0), device=self.candidates.device)
        rows = rows.repeat_interleave(len(SNLI_ANSWERS))
        encoder_out = self.model.encoder.reorder_encoder_out(encoder_out, rows)
        logits = self.model.decoder(self.candidates, encoder_out=encoder_out)[0]
        return logits[:, -1].gather(-1, self.candidates[:, -1:]).view(-1, len(SNLI_ANSWERS)).argmax(-1)


def configs(args):
    """The configurations timed: CONFIGS, plus mue with each --layouts value (mue_rows, mue_dense)."""
    return CONFIGS + tuple(f"mue_{layout}" for layout in args.layouts)


def make_runners(model, task, bsz, thres, args, tokenizer, device):
    dictionary = model.decoder.dictionary
    candidates = snli_candidates(bsz, dictionary, tokenizer).to(device) if task == "snli_ve" else None
    exits = {"full_per_row": None, "full": None, "bookkeeping": exit_config(**NEVER), "mue": exit_config(**thres)}
    exits.update({f"mue_{layout}": exit_config(**thres, dec_compaction=layout) for layout in args.layouts})
    return {c: Runner(model, dictionary, task, exits[c], c != "full_per_row", args.beam, args.max_len_b, candidates)
            for c in configs(args)}


def count_syncs(runner, sample):
    """Host-device syncs inside the decoder's calls and beam reorders, per decoder call (one generated token
    per row, or the whole teacher-forced answer scoring), on an untimed run."""
    model = runner.model
    counter = SyncCounter()
    with torch.no_grad(), counter.watch(model.decoder, ("reorder_incremental_state",)) as watched, \
            counter.watch(model.encoder, ("reorder_encoder_out",)):
        runner(sample)
    return counter.count / max(1, watched.calls["forward"])


def time_configs(runners, sample, repeats, sync=lambda: None):
    """One warm-up round, then `repeats` timed rounds; configs interleaved, order rotated per round.
    `sync` waits for the device's queued work (torch.cuda.synchronize on a GPU).
    Returns {config: (median seconds, (fastest, slowest) seconds, stats of the last timed run)}."""
    names = list(runners)
    times = {n: [] for n in names}
    stats = {}
    with torch.no_grad():
        for rnd in range(repeats + 1):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                result = runners[name](sample)
                sync()
                elapsed = time.perf_counter() - start
                if rnd > 0:
                    times[name].append(elapsed)
                    stats[name] = result
    return {n: (statistics.median(times[n]), (min(times[n]), max(times[n])), stats[n]) for n in names}


def bench_one(model, size, task, bsz, args, tokenizer):
    sample = make_sample(task, bsz, args.image_size[size], model.decoder.dictionary, tokenizer, args.seed + bsz,
                         args.device, DTYPES[args.dtype], args.per_image if task == "snli_ve" else 1)
    thres = {"img_thres": args.img_thres[size], "txt_thres": args.txt_thres[size], "dec_thres": args.dec_thres[size]}
    runners = make_runners(model, task, bsz, thres, args, tokenizer, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    results = time_configs(runners, sample, args.repeats, sync)
    with torch.no_grad():  # what the per-row layout computes: an accounted run of it (untimed)
        per_row = Runner(model, model.decoder.dictionary, task, exit_config(**NEVER), False, args.beam,
                         args.max_len_b, runners["full"].candidates)(sample)
    syncs = {c: count_syncs(runners[c], sample) for c in configs(args) if c == "bookkeeping" or c.startswith("mue")}
    memory = {c: peak_memory(args, size, task, bsz, c) for c in configs(args)} if args.memory else {}
    rows = rows_for(size, task, bsz, results, per_row, syncs, memory, model_sizes(model), thres)
    if task == "snli_ve":  # the exact sharing must not change an answer
        same = bool(torch.equal(runners["full"].answers, runners["full_per_row"].answers))
        for row in rows:
            row["per_pair_gflops"] = row["gflops"] / bsz
            row["per_pair_ms"] = 1000 * row["time_s"] / bsz
            if row["config"] == "full":
                row["answers_as_per_row"] = "same" if same else "DIFFERENT"
    return rows


def rows_for(size, task, bsz, results, per_row, syncs, memory, sizes, thres):
    """Table rows of one size x task x batch. FLOPs of `full` are those the bookkeeping run counts as full
    (thresholds 1.0 reproduce the full model exactly, on the same inputs); those of `full_per_row` come
    from an accounted run of that layout."""
    t_full, t_per_row = results["full"][0], results["full_per_row"][0]
    f_full = results["bookkeeping"][2].summary()["flops_spent"]
    f_per_row = per_row.summary()["flops_spent"]
    rows = []
    for config in results:
        seconds, (fastest, slowest), stats = results[config]
        row = {"size": size, "task": task, "batch": bsz, "config": config, "time_s": seconds,
               "spread": f"{fastest:.3f}-{slowest:.3f}", "time_min_s": fastest, "time_max_s": slowest,
               "thresholds": thres if config.startswith("mue") else (NEVER if config == "bookkeeping" else None),
               "syncs_per_step": syncs.get(config), "peak_mem_gb": memory.get(config)}
        if stats is not None:
            row["images_encoded"] = stats.summary()["images_encoded"]
        if stats is None:
            row.update(img_layers=float(sizes["n_enc"]), txt_layers=float(sizes["n_enc"]),
                       dec_layers=float(sizes["n_dec"]), gflops=(f_per_row if config == "full_per_row" else f_full) / 1e9)
        else:
            summary = stats.summary()
            row.update(img_layers=summary["mean_image_layers"], txt_layers=summary["mean_text_layers"],
                       dec_layers=summary["mean_decoder_layers"], gflops=summary["flops_spent"] / 1e9)
        flops = row["gflops"] * 1e9
        if config != "full_per_row":
            row["vs_per_row_measured"] = t_per_row / seconds
            row["vs_per_row_flops"] = f_per_row / flops
            row["vs_per_row_efficiency"] = row["vs_per_row_measured"] / row["vs_per_row_flops"]
        if config == "bookkeeping" or config.startswith("mue"):
            row["speedup_measured"] = t_full / seconds
            row["speedup_flops"] = f_full / flops
            row["efficiency"] = row["speedup_measured"] / row["speedup_flops"]
        if config.startswith("mue"):
            ok = min(row["efficiency"], row["vs_per_row_efficiency"]) >= EFFICIENCY_GOAL
            row["goal"] = f"efficiency >= {EFFICIENCY_GOAL:.2f} vs both full models: {'met' if ok else 'MISSED'}"
            row["goal_met"] = ok
        if config == "bookkeeping":
            row["overhead"] = seconds / t_full - 1.0
            ok = row["overhead"] < OVERHEAD_GOAL
            row["goal"] = f"overhead < {OVERHEAD_GOAL:.0%}: {'met' if ok else 'MISSED'}"
            row["goal_met"] = ok
        rows.append(row)
    return rows


# ---------------------------------------------------------------- peak memory
def peak_memory(args, size, task, bsz, config) -> float:
    """GB at the peak of one call of `config`: on a GPU the allocator's peak; on the CPU the peak resident
    size of a fresh process that builds the model and makes that one call (the model included)."""
    if args.device == "cuda":
        torch.manual_seed(args.seed)
        model = build_arch(ARCHS[size], dictionary=None, dropout=0.0).eval().to(args.device, DTYPES[args.dtype])
        tokenizer = Tokenizer()
        sample = make_sample(task, bsz, args.image_size[size], model.decoder.dictionary, tokenizer,
                             args.seed + bsz, args.device, DTYPES[args.dtype])
        runner = make_runners(model, task, bsz, {k: 1.0 for k in NEVER} if config != "mue" else
                              {"img_thres": args.img_thres[size], "txt_thres": args.txt_thres[size],
                               "dec_thres": args.dec_thres[size]}, args, tokenizer, args.device)[config]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            runner(sample)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1e9
        del model, runner
        return peak
    child = [sys.executable, "-m", "mue.benchmarks.bench_inference", "--memory-child", f"{size}:{task}:{bsz}:{config}",
             "--image-size", f"{size}={args.image_size[size]}", "--sizes", size, "--beam", str(args.beam),
             "--max-len-b", str(args.max_len_b), "--seed", str(args.seed), "--threads", str(args.threads),
             "--img-thres", f"{size}={args.img_thres[size]}", "--txt-thres", f"{size}={args.txt_thres[size]}",
             "--dec-thres", f"{size}={args.dec_thres[size]}", "--per-image", str(args.per_image),
             *(["--layouts", ",".join(args.layouts)] if args.layouts else [])]
    out = subprocess.run(child, capture_output=True, text=True, check=True, env=child_env()).stdout
    return float(out.strip().splitlines()[-1])


def memory_child(args):
    """--memory-child SIZE:TASK:BATCH:CONFIG: one call, then print the peak resident size in GB."""
    size, task, bsz, config = args.memory_child.split(":")
    bsz = int(bsz)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_arch(ARCHS[size], dictionary=None, dropout=0.0).eval()
    tokenizer = Tokenizer()
    sample = make_sample(task, bsz, args.image_size[size], model.decoder.dictionary, tokenizer, args.seed + bsz,
                         per_image=args.per_image if task == "snli_ve" else 1)
    thres = {"img_thres": args.img_thres[size], "txt_thres": args.txt_thres[size], "dec_thres": args.dec_thres[size]}
    with torch.no_grad():
        make_runners(model, task, bsz, thres, args, tokenizer, "cpu")[config](sample)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)  # kB on Linux


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="micro,base", help="comma list of: " + ",".join(ARCHS))
    p.add_argument("--tasks", default="caption,snli_ve", help="comma list of: " + ",".join(TASKS))
    p.add_argument("--batch-sizes", default="1,16", help="comma list of batch sizes")
    p.add_argument("--image-size", default=DEFAULT_IMAGE_SIZE,
                   help="pixels (square), one number or SIZE=N per size (default %(default)s; OFA uses 480; "
                        "base at 192 keeps the default run near 6 min on 2 cores, base=256 about doubles it)")
    p.add_argument("--img-thres", default=DEFAULT_THRES, help="image-stream threshold, number or SIZE=X list")
    p.add_argument("--txt-thres", default=DEFAULT_THRES, help="text-stream threshold, number or SIZE=X list")
    p.add_argument("--dec-thres", default=DEFAULT_THRES, help="decoder threshold (constant), number or SIZE=X list")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds after one warm-up round (median reported; 2 keeps the default run near "
                        "6 min on 2 cores: base caption at batch 16 costs ~20 s a call)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--max-len-b", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models run")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="weights and activations (float16/bfloat16 as one serves on a GPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0 (default) keeps torch's default (one per core)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and machine info as JSON")
    p.add_argument("--per-image", type=int, default=1,
                   help="snli_ve: this many consecutive rows ask about one image (real SNLI-VE: ~18 per image); "
                        "the full model shares each image's stream (exact), full_per_row runs it per row")
    p.add_argument("--layouts", default="", help="also time mue with these --dec-compaction layouts, comma list "
                   "of rows,dense (configs mue_rows, mue_dense; mue itself uses the default, rows)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak memory of one call per configuration (on the CPU: a fresh "
                        "process per configuration, which adds a model build and a call each)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test setting: micro only, batch 2, 32 px, 1 repeat, max_len_b 4")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if args.quick:
        args.sizes, args.batch_sizes, args.image_size, args.repeats, args.max_len_b = "micro", "2", "32", 1, 4
    args.sizes = parse_list(args.sizes, str, "--sizes", ARCHS)
    args.tasks = parse_list(args.tasks, str, "--tasks", TASKS)
    args.batch_sizes = parse_list(args.batch_sizes, int, "--batch-sizes")
    args.layouts = parse_list(args.layouts, str, "--layouts", ("rows", "dense")) if args.layouts else []
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f"--batch-sizes: every batch size must be >= 1, got {args.batch_sizes}")
    if args.per_image < 1:
        raise SystemExit(f"--per-image must be >= 1, got {args.per_image}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    args.image_size = per_size(args.image_size, args.sizes, int, "--image-size")
    for name in ("img_thres", "txt_thres", "dec_thres"):
        setattr(args, name, per_size(getattr(args, name), args.sizes, float, "--" + name.replace("_", "-")))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    notes = [
        f"random-weight models (seed {args.seed}), eval mode, no_grad, {args.dtype} on {args.device}, dropout 0",
        "image size per model: " + ", ".join(f"{s} {args.image_size[s]}px" for s in args.sizes)
        + " (OFA uses 480px; base runs at 192px by default to keep CPU time sane)",
        "MuE thresholds (img/txt/dec, constant decoder schedule, kv copy, --dec-compaction rows): "
        + ", ".join(f"{s} {args.img_thres[s]}/{args.txt_thres[s]}/{args.dec_thres[s]}" for s in args.sizes),
        f"caption: beam {args.beam}, max_len_b {args.max_len_b}; snli_ve: one encoder pass + teacher-forced "
        "decoder over [bos, answer] x 3 candidates",
        "full_per_row: every beam row / candidate with its own copy of its source (the layout before mue shared "
        "it); full: one copy per source (exact); bookkeeping: exit code on, thresholds 1; mue: exits",
        f"time_s: median of {args.repeats} timed round(s) after one warm-up round, configs interleaved; spread: "
        "fastest-slowest timed round",
        "speedup_* = against full, vs_per_row_* = against full_per_row: measured = time ratio, flops = FLOP ratio, "
        "efficiency = measured / flops; overhead = t_bookkeeping / t_full - 1",
        "syncs_per_step: host-device syncs inside the decoder's calls and the beam reorders, per decoder call "
        "(mue.exiting.syncs; fairseq's own beam-search loop not counted)",
        f"goals: mue's efficiency >= {EFFICIENCY_GOAL:.0%} against both full models; bookkeeping overhead < "
        f"{OVERHEAD_GOAL:.0%}",
    ]
    print_header("MuE inference benchmark", info, notes)
    tokenizer = Tokenizer()
    all_rows = []
    started = time.perf_counter()
    for size in args.sizes:
        torch.manual_seed(args.seed)
        model = build_arch(ARCHS[size], dictionary=None, dropout=0.0).eval().to(args.device, DTYPES[args.dtype])
        for task in args.tasks:
            for bsz in args.batch_sizes:
                rows = bench_one(model, size, task, bsz, args, tokenizer)
                all_rows.extend(rows)
                print(f"<!-- done {size} {task} batch {bsz} after {time.perf_counter() - started:.0f}s -->", flush=True)
        del model
    total = time.perf_counter() - started
    print()
    print(markdown_table(all_rows, COLUMNS, {"time_s": ".4f", "gflops": ".2f", "img_layers": ".2f",
                                             "txt_layers": ".2f", "dec_layers": ".2f", "overhead": "+.1%",
                                             "syncs_per_step": ".1f", "peak_mem_gb": ".2f"}))
    goals = [r for r in all_rows if "goal_met" in r]
    met = sum(r["goal_met"] for r in goals)
    print(f"\ngoals met: {met} of {len(goals)}; total benchmark time {total:.0f}s; "
          f"load average (1 min) at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "notes": notes, "columns": list(COLUMNS), "rows": all_rows,
                       "total_s": total}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
