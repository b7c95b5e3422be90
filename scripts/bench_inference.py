#!/usr/bin/env python
"""Inference benchmark of MuE's early exits on random-weight mue_ofa models (CPU, or a GPU with --device cuda).

For each size x task x batch it times three configurations of the same model:
  full         exits compiled out: fairseq's plain SequenceGenerator (caption) or the model with no
               exit settings (snli_ve);
  bookkeeping  the exit code path on (ExitSettings with a trace) but every threshold 1.0, so nothing
               exits: its cost over `full` is the price of the bookkeeping;
  mue          the real cosine exit policy with the given thresholds.
and reports wall clock (median of --repeats after one warm-up round; the configurations are
interleaved round by round so that load from other processes hits all of them alike), the layers
actually run, FLOPs spent/full (mue.exiting.accounting), measured vs FLOP-predicted speedup and the
bookkeeping overhead, with the goals beside them.

Random weights rarely saturate, so the thresholds are chosen per size (--img/txt/dec-thres) to land
in a mid-range reduction; the table shows the layers they really ran.

    python scripts/bench_inference.py                    # default: micro and base, ~6 min on 2 cores
    python scripts/bench_inference.py --quick --json out.json
    python scripts/bench_inference.py --device cuda --sizes base --image-size 480 --batch-sizes 1,16,64

On a GPU every timed call is bracketed by torch.cuda.synchronize(), so the times include the kernels'
work, not only their launch.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

import mue  # noqa: F401  (registers the model with fairseq, applies compat patches)
from fairseq.sequence_generator import SequenceGenerator
from mue.data.tokenizer import Tokenizer
from mue.exiting.accounting import account, model_sizes, new_stats
from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.generation.generator import MueSequenceGenerator
from mue.models import build_arch

ARCHS = {"micro": "mue_ofa_micro", "base": "mue_ofa_base"}
TASKS = ("caption", "snli_ve")
CONFIGS = ("full", "bookkeeping", "mue")
NEVER = {"img_thres": 1.0, "txt_thres": 1.0, "dec_thres": 1.0}
EFFICIENCY_GOAL = 0.80  # measured speedup / FLOP-predicted speedup, at batch >= GOAL_BATCH
GOAL_BATCH = 16
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

COLUMNS = ("size", "task", "batch", "config", "time_s", "img_layers", "txt_layers", "dec_layers",
           "gflops_spent", "gflops_full", "speedup_measured", "speedup_flops", "efficiency", "overhead", "goal")


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


def make_sample(task, bsz, image_size, dictionary, tokenizer, seed, device="cpu", dtype=torch.float32):
    """A batch as the collater makes it (random images, real prompt text), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    if task == "caption":
        texts = [CAPTION_PROMPT]
    else:
        texts = [f' does the image describe " {h} "?' for h in SNLI_HYPOTHESES]
    src_tokens, src_lengths = encode_rows(tokenizer, dictionary, texts, bsz)
    images = (torch.rand(bsz, 3, image_size, image_size, generator=gen) * 2 - 1).to(dtype)  # mean=std=0.5
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
class CaptionRunner:
    """Beam search (beam 5, max_len_b 16) with or without the exit machinery."""

    def __init__(self, model, dictionary, exits, beam, max_len_b):
        common = dict(beam_size=beam, max_len_b=max_len_b)
        if exits is None:
            self.generator = SequenceGenerator([model], dictionary, **common)
        else:
            self.generator = MueSequenceGenerator([model], dictionary, exit_config=exits, **common)
        self.model = model

    def __call__(self, sample):
        if isinstance(self.generator, MueSequenceGenerator):
            self.generator.reset_stats()
        self.generator.generate([self.model], sample)
        return getattr(self.generator, "stats", None)


class SnliRunner:
    """One encoder pass, then the teacher-forced decoder over [bos, answer] for the 3 candidates."""

    def __init__(self, model, dictionary, exits, candidates):
        self.model, self.exits, self.candidates = model, exits, candidates
        self.sizes = model_sizes(model)

    def __call__(self, sample):
        if self.exits is None:
            self._score(sample)
            return None
        with exit_session(self.model, self.exits) as settings:
            self._score(sample)
        return account(new_stats(self.model), settings.trace, self.sizes)

    def _score(self, sample):
        net = sample["net_input"]
        encoder_out = self.model.encoder(net["src_tokens"], net["src_lengths"], net["patch_images"], net["patch_masks"])
        rows = torch.arange(net["src_tokens"].size(0), device=self.candidates.device)
        rows = rows.repeat_interleave(len(SNLI_ANSWERS))
        encoder_out = self.model.encoder.reorder_encoder_out(encoder_out, rows)
        self.model.decoder(self.candidates, encoder_out=encoder_out)


def time_configs(runners, sample, repeats, sync=lambda: None):
    """One warm-up round, then `repeats` timed rounds; configs interleaved, order rotated per round.
    `sync` waits for the device's queued work (torch.cuda.synchronize on a GPU).
    Returns {config: (median seconds, fastest seconds, stats of the last timed run)}."""
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
    return {n: (statistics.median(times[n]), min(times[n]), stats[n]) for n in names}


def bench_one(model, size, task, bsz, args, tokenizer):
    dictionary = model.decoder.dictionary
    sample = make_sample(task, bsz, args.image_size[size], dictionary, tokenizer, args.seed + bsz,
                         args.device, DTYPES[args.dtype])
    thres = {"img_thres": args.img_thres[size], "txt_thres": args.txt_thres[size], "dec_thres": args.dec_thres[size]}
    kwargs = {"full": None, "bookkeeping": exit_config(**NEVER), "mue": exit_config(**thres)}
    if task == "caption":
        runners = {c: CaptionRunner(model, dictionary, kwargs[c], args.beam, args.max_len_b) for c in CONFIGS}
    else:
        candidates = snli_candidates(bsz, dictionary, tokenizer).to(args.device)
        runners = {c: SnliRunner(model, dictionary, kwargs[c], candidates) for c in CONFIGS}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    results = time_configs(runners, sample, args.repeats, sync)
    return rows_for(size, task, bsz, results, model_sizes(model), thres)


def rows_for(size, task, bsz, results, sizes, thres):
    """Table rows of one size x task x batch; the full run's layers/FLOPs are the bookkeeping run's
    `full` counts (thresholds 1.0 reproduce the full model exactly, on the same inputs)."""
    t_full = results["full"][0]
    rows = []
    for config in CONFIGS:
        seconds, fastest, stats = results[config]
        row = {"size": size, "task": task, "batch": bsz, "config": config, "time_s": seconds, "time_min_s": fastest,
               "thresholds": thres if config == "mue" else (NEVER if config == "bookkeeping" else None)}
        summary = (stats or results["bookkeeping"][2]).summary()
        if config == "full":
            row.update(img_layers=float(sizes["n_enc"]), txt_layers=float(sizes["n_enc"]),
                       dec_layers=float(sizes["n_dec"]), gflops_spent=summary["flops_full"] / 1e9)
        else:
            row.update(img_layers=summary["mean_image_layers"], txt_layers=summary["mean_text_layers"],
                       dec_layers=summary["mean_decoder_layers"], gflops_spent=summary["flops_spent"] / 1e9)
            row["speedup_measured"] = t_full / seconds
            row["speedup_flops"] = summary["flops_full"] / summary["flops_spent"]
        row["gflops_full"] = summary["flops_full"] / 1e9
        if config == "mue":
            row["efficiency"] = row["speedup_measured"] / row["speedup_flops"]
            if bsz >= GOAL_BATCH:
                ok = row["efficiency"] >= EFFICIENCY_GOAL
                row["goal"] = f"efficiency >= {EFFICIENCY_GOAL:.2f}: {'met' if ok else 'MISSED'}"
                row["goal_met"] = ok
        if config == "bookkeeping":
            row["overhead"] = seconds / t_full - 1.0
            ok = row["overhead"] < OVERHEAD_GOAL
            row["goal"] = f"overhead < {OVERHEAD_GOAL:.0%}: {'met' if ok else 'MISSED'}"
            row["goal_met"] = ok
        rows.append(row)
    return rows


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
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f"--batch-sizes: every batch size must be >= 1, got {args.batch_sizes}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    args.image_size = per_size(args.image_size, args.sizes, int, "--image-size")
    for name in ("img_thres", "txt_thres", "dec_thres"):
        setattr(args, name, per_size(getattr(args, name), args.sizes, float, "--" + name.replace("_", "-")))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    notes = [
        f"random-weight models (seed {args.seed}), eval mode, no_grad, {args.dtype} on {args.device}, dropout 0",
        "image size per model: " + ", ".join(f"{s} {args.image_size[s]}px" for s in args.sizes)
        + " (OFA uses 480px; base runs at 192px by default to keep CPU time sane: ~6 min for the default "
        "run on 2 cores; --image-size micro=64,base=256 roughly doubles base's share)",
        "MuE thresholds (img/txt/dec, constant decoder schedule, kv copy): "
        + ", ".join(f"{s} {args.img_thres[s]}/{args.txt_thres[s]}/{args.dec_thres[s]}" for s in args.sizes),
        f"caption: beam {args.beam}, max_len_b {args.max_len_b}; full = fairseq SequenceGenerator without exit "
        "settings; snli_ve: one encoder pass + teacher-forced decoder over [bos, answer] x 3 candidates",
        f"time_s: median of {args.repeats} timed round(s) after one warm-up round, configs interleaved",
        "speedup_measured = t_full / t_config; speedup_flops = FLOPs full / FLOPs spent; "
        "efficiency = measured / FLOP-predicted; overhead = t_bookkeeping / t_full - 1",
        f"goals: at batch >= {GOAL_BATCH} efficiency >= {EFFICIENCY_GOAL:.0%}; bookkeeping overhead < {OVERHEAD_GOAL:.0%}",
        "snli_ve's teacher-forced decoder runs every position (exits only freeze states), so its decoder "
        "FLOP savings are counted but not realised; the encoder dominates there",
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
    print(markdown_table(all_rows, COLUMNS, {"time_s": ".4f", "gflops_spent": ".2f", "gflops_full": ".2f",
                                             "img_layers": ".2f", "txt_layers": ".2f", "dec_layers": ".2f",
                                             "overhead": "+.1%"}))
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
