"""Documented patches that ve-fairseq 0.12.3 needs on torch 2.14 and on CPU-only machines.

`apply()` installs all of them once (idempotent); `mue/__init__.py` calls it at import, so
`fairseq-train/-generate --user-dir mue` get them before any checkpoint or batch is touched.
Every patch replaces one module attribute and keeps the replaced object in `ORIGINALS`
(key "module.attribute"); the replacement carries it as `_mue_original` too.

Patches (each with a test in tests/test_compat.py or tests/test_errors.py that fails without it;
see docs/PATCHES.md):
1. `allow_fairseq_checkpoint_globals`: torch >= 2.6 loads with weights_only=True, and fairseq
   checkpoints pickle argparse/omegaconf objects. Plus `load_legacy_checkpoint` /
   `trusted_pickle_loading` for trusted old pickles (official OFA checkpoints).
2. `keep_last_partial_batch`: fairseq drops the last batch when --required-batch-size-multiple > 1.
3. `cpu_safe_ddp`, `cpu_safe_torchrun`: pytorch_ddp and torchrun on CPU (gloo).
4. `quiet_root_logger`: `import fairseq` sets the root logger to DEBUG.
5. `one_line_user_errors`: a `sys.excepthook` that prints an uncaught `mue.errors.UserError` (bad data,
   bad option value, checkpoint that does not fit) as one `error: <message>` line instead of a traceback,
   also when torch re-raises it from a DataLoader worker or a spawned worker; MUE_DEBUG=1 keeps the
   traceback.
6. `task_options_in_help`: fairseq's `--help` omits the options of the chosen task, model and criterion.

Distributed training on the CPU, what works after these patches:
- torchrun --nproc-per-node N fairseq-train ... --cpu --distributed-world-size N
  (--distributed-backend gloo; nccl is switched to gloo with a warning when there is no CUDA).
- N processes started by hand with --distributed-no-spawn --distributed-init-method tcp://...
  --distributed-rank R --distributed-world-size N --distributed-backend gloo --cpu.
- Not patched: fairseq's own spawning (--distributed-world-size N without torchrun or
  --distributed-no-spawn) counts CUDA devices and fails with "have 0 available devices".
- Under torchrun, --distributed-world-size must be given: its default is the CUDA device count
  (1 on a CPU machine), with which fairseq skips distributed init and every rank trains alone
  and overwrites the same checkpoint files. `cpu_safe_torchrun` turns that into a clear error.
"""
import argparse
import collections
import contextlib
import logging
import os
import pathlib
import sys
import typing

import numpy as np
import torch

from mue.errors import user_message

logger = logging.getLogger(__name__)

ORIGINALS: dict = {}
_APPLIED = False


def _replace(module, name, replacement):
    """Set `module.name = replacement` once, remembering the original in ORIGINALS."""
    key = f"{module.__name__}.{name}"
    if key in ORIGINALS:
        return
    original = getattr(module, name)
    replacement._mue_original = original
    ORIGINALS[key] = original
    setattr(module, name, replacement)


# --------------------------------------------------------------------------------------------
# 1. weights_only checkpoint loading
# --------------------------------------------------------------------------------------------


def fairseq_checkpoint_globals() -> list:
    """Types that fairseq checkpoints pickle besides tensors and plain containers.

    - argparse.Namespace: `state["args"]` of old checkpoints, and `cfg.model` of models
      registered with add_args (kept as a Namespace inside the cfg).
    - omegaconf DictConfig/ListConfig with their metadata and value nodes, typing.Any,
      collections.defaultdict and builtin types used as metadata (key/element/ref types):
      what a pickled DictConfig cfg consists of.
    - pathlib paths (PathNode values), numpy scalars and dtypes (metric values such as
      `best`/`val_loss` can be numpy floats).
    All of these only build data; none runs code chosen by the file.
    """
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    numpy_scalar = np.float64(0).__reduce__()[0]  # numpy(._core).multiarray.scalar
    numeric = (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)
    numpy_dtype_classes = sorted({type(np.dtype(t)) for t in numeric}, key=str)  # Float64DType...
    return [
        argparse.Namespace,
        DictConfig,
        ListConfig,
        Metadata,
        ContainerMetadata,
        nodes.AnyNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.StringNode,
        nodes.BooleanNode,
        nodes.BytesNode,
        nodes.PathNode,
        typing.Any,
        collections.defaultdict,
        int,
        float,
        str,
        bool,
        bytes,
        list,
        dict,
        pathlib.Path,
        type(pathlib.Path()),
        numpy_scalar,
        np.dtype,
        *numpy_dtype_classes,
    ]


def allow_fairseq_checkpoint_globals() -> None:
    """Allow-list fairseq's checkpoint contents for weights_only loading.

    Breaks: torch >= 2.6 defaults `torch.load` to weights_only=True, so fairseq's
    `checkpoint_utils.load_checkpoint_to_cpu` (fairseq-generate --path, --restore-file, resume)
    fails with "Unsupported global: GLOBAL argparse.Namespace".
    Fix: `torch.serialization.add_safe_globals(fairseq_checkpoint_globals())`. Loading stays
    weights_only: a file pickling anything else (arbitrary classes or functions) is still refused.
    """
    known = set(map(id, torch.serialization.get_safe_globals()))
    missing = [g for g in fairseq_checkpoint_globals() if id(g) not in known]
    if missing:
        torch.serialization.add_safe_globals(missing)


@contextlib.contextmanager
def trusted_pickle_loading():
    """Within this block, `torch.load` calls that do not pass weights_only unpickle fully.

    TRUST DECISION: full unpickling can run arbitrary code stored in the file. Use it only
    for files whose origin you trust (e.g. the official OFA checkpoints), to let fairseq's own
    loaders (`load_checkpoint_to_cpu`, `load_model_ensemble`) read them. It sets torch's
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the block (process-wide, not thread-safe) and restores
    the previous value. From the shell the same is `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 fairseq-...`.
    """
    name = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def load_legacy_checkpoint(path) -> dict:
    """Load an older, trusted checkpoint (e.g. official OFA `*.pt`) with weights_only=False.

    TRUST DECISION: this fully unpickles the file, which can execute code stored in it.
    Call it only for files you trust; everything else goes through fairseq's loader with the
    allow-list of `allow_fairseq_checkpoint_globals`. Returns the raw state dict on the CPU,
    without fairseq's upgrades (`args` -> `cfg`), which may need architectures not registered here.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    logger.warning("loading %s with weights_only=False (trusted file, full unpickling)", path)
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# 2. last partial batch
# --------------------------------------------------------------------------------------------


def _batch_by_size_keep_last(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None,
                             max_sentences=None, required_batch_size_multiple=1,
                             fixed_shapes=None):
    """fairseq's batch_by_size, plus the final partial batch it drops (see keep_last_partial_batch)."""
    original = ORIGINALS["fairseq.data.data_utils.batch_by_size"]
    if not isinstance(indices, np.ndarray):
        indices = np.fromiter(indices, dtype=np.int64, count=-1)
    batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                       required_batch_size_multiple, fixed_shapes)
    if fixed_shapes is not None or required_batch_size_multiple <= 1:
        return batches
    covered = sum(len(b) for b in batches)
    if covered < len(indices):
        batches = list(batches) + [np.asarray(indices[covered:], dtype=np.int64)]
    return batches


def keep_last_partial_batch() -> None:
    """Never drop examples in `fairseq.data.data_utils.batch_by_size`.

    Breaks: with --required-batch-size-multiple M > 1 (default 8), fairseq's batch_by_size ends
    with `if bsz_mult > 1 and len(b[-1]) % bsz_mult != 0: b = b[:-1]` (upstream issue 5036), so
    the last batch of every epoch and of every evaluation is silently lost (fairseq-generate
    scored 48 of 50 sentences). The Cython batcher itself (data_utils_fast) keeps it.
    Fix: wrap batch_by_size; the Cython batcher consumes `indices` in order, so the dropped batch
    is exactly the indices after those covered, and it is appended back. It already met
    max_tokens/max_sentences; it is merely not a multiple of M. Applies to training too.
    """
    from fairseq.data import data_utils

    _replace(data_utils, "batch_by_size", _batch_by_size_keep_last)


# --------------------------------------------------------------------------------------------
# 3. distributed training on the CPU
# --------------------------------------------------------------------------------------------


def _ddp_cpu_safe(module, *args, **kwargs):
    """torch DistributedDataParallel, without device_ids/output_device for a CPU module."""
    original = ORIGINALS["fairseq.models.distributed_fairseq_model.DistributedDataParallel"]
    params = list(module.parameters())
    if params and all(p.device.type == "cpu" for p in params):
        kwargs.pop("device_ids", None)
        kwargs.pop("output_device", None)
    return original(module, *args, **kwargs)


def cpu_safe_ddp() -> None:
    """Let --ddp-backend pytorch_ddp/c10d wrap a CPU model.

    Breaks: `fairseq.models.distributed_fairseq_model.DistributedFairseqModel` always builds
    `DistributedDataParallel(..., device_ids=[args.device_id], output_device=args.device_id)`;
    torch rejects device ids for a CPU module ("device_ids and output_device arguments only work
    with single-device/multiple-device GPU modules"), so --cpu training with the default
    ddp backend fails under gloo.
    Fix: replace the `DistributedDataParallel` name inside that module by a factory that drops
    both arguments when all the module's parameters are on the CPU (what --cpu, or a machine
    without CUDA, gives) and otherwise passes everything through. The result is a true DDP.
    """
    from fairseq.models import distributed_fairseq_model

    _replace(distributed_fairseq_model, "DistributedDataParallel", _ddp_cpu_safe)


def _torchrun_init_cpu_safe(cfg):
    """fairseq's torchrun (env://) settings, with device_id 0 and gloo when there is no CUDA."""
    if torch.cuda.device_count() > 0:
        return ORIGINALS["fairseq.distributed.utils._infer_torch_distributed_launch_init"](cfg)
    cfg.distributed_init_method = "env://"
    cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    cfg.distributed_rank = int(os.environ["RANK"])
    cfg.device_id = 0
    cfg.distributed_no_spawn = True  # torchrun already started the processes
    if cfg.distributed_backend == "nccl":
        logger.warning("no CUDA device: using --distributed-backend gloo instead of nccl")
        cfg.distributed_backend = "gloo"


def _infer_init_method_guarded(cfg, force_distributed=False):
    """fairseq's infer_init_method, refusing torchrun ranks that would each train alone."""
    world = os.environ.get("WORLD_SIZE", "")
    launched = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if (cfg.distributed_init_method is None and not cfg.tpu and launched
            and world.isdigit() and int(world) > 1 and cfg.distributed_world_size == 1):
        raise ValueError(
            f"torchrun started WORLD_SIZE={world} processes but --distributed-world-size is 1 "
            f"(its default on a machine without CUDA): each rank would train alone and overwrite "
            f"the same checkpoints. Pass --distributed-world-size {world}."
        )
    original = ORIGINALS["fairseq.distributed.utils.infer_init_method"]
    return original(cfg, force_distributed)


def cpu_safe_torchrun() -> None:
    """Make fairseq under torchrun work on CPU-only machines, or fail clearly.

    Breaks: (a) `fairseq.distributed.utils._infer_torch_distributed_launch_init` sets
    `cfg.device_id = cfg.distributed_rank % torch.cuda.device_count()`, an integer modulo by
    zero without CUDA; (b) `infer_init_method` returns early when distributed_world_size == 1,
    the default without CUDA, so torchrun ranks silently train alone.
    Fix: (a) without CUDA, set the same fields with device_id 0 (and gloo for nccl); with CUDA
    the original runs. (b) raise a ValueError naming --distributed-world-size in that case.
    """
    from fairseq.distributed import utils as distributed_utils

    _replace(distributed_utils, "_infer_torch_distributed_launch_init", _torchrun_init_cpu_safe)
    _replace(distributed_utils, "infer_init_method", _infer_init_method_guarded)


# --------------------------------------------------------------------------------------------
# 4. the root logger
# --------------------------------------------------------------------------------------------


def quiet_root_logger() -> None:
    """`import fairseq` sets the root logger to DEBUG (a `logging.basicConfig(level=DEBUG)` in
    fairseq/models/wav2vec/wav2vec2_classification.py runs at import), so any process that imports
    fairseq before fairseq_cli configures logging (scripts, in-process fairseq-generate) floods stderr
    with Pillow/matplotlib debug lines. Put the root level back to fairseq_cli's own default:
    $LOGLEVEL, else INFO. Only a DEBUG root is touched, and only when LOGLEVEL does not ask for it."""
    root = logging.getLogger()
    wanted = os.environ.get("LOGLEVEL", "INFO").upper()
    if root.level == logging.DEBUG and wanted != "DEBUG":
        root.setLevel(wanted)


# --------------------------------------------------------------------------------------------
# 5. one-line user errors
# --------------------------------------------------------------------------------------------


def _excepthook(exc_type, exc, tb):
    """sys.excepthook: an uncaught UserError as `error: <message>` on stderr, anything else unchanged."""
    debug = os.environ.get("MUE_DEBUG", "") not in ("", "0")
    message = None if debug else user_message(exc)
    if message is None:
        return ORIGINALS["sys.excepthook"](exc_type, exc, tb)
    print(f"error: {message}", file=sys.stderr, flush=True)


def one_line_user_errors() -> None:
    """Show bad data / bad options / unfitting checkpoints as one line, not a traceback.

    Breaks: fairseq's CLIs (`fairseq-train`, `fairseq-generate`) catch nothing, so a DataError that
    already names file:line reaches the user under a 30-line traceback, which reads like a crash of
    the program rather than a fault in the data. torch hides the error further: a DataLoader worker
    (fairseq-generate's default --num-workers 1) re-raises it with the worker's traceback inside the
    message, and torch.multiprocessing.spawn (fairseq's multi-GPU workers) raises a
    ProcessRaisedException holding the child's traceback as text; fairseq's Trainer.load_checkpoint
    (--restore-file, --finetune-from-model) re-raises a checkpoint mismatch as a bare Exception.
    Fix: wrap `sys.excepthook`. For a `mue.errors.UserError`, also one found inside such a wrapper
    (`mue.errors.user_message`), print `error: <message>` to stderr; Python still exits with status 1.
    Any other exception, or any exception when MUE_DEBUG=1 (any value but 0) is set, goes to the
    previous hook: the usual traceback. Under torchrun every worker runs the CLI itself, so the hook
    covers each of them.
    """
    _replace(sys, "excepthook", _excepthook)


# --------------------------------------------------------------------------------------------
# 6. --help with the task's options
# --------------------------------------------------------------------------------------------

HELP_FLAGS = ("-h", "--help")


def _parse_args_and_arch_with_full_help(parser, input_args=None, parse_known=False, suppress_defaults=False,
                                        modify_parser=None):
    """fairseq's parse_args_and_arch; with -h/--help, the help is printed after the task's, model's and
    criterion's options were added, so it lists them (mue's exit knobs among them)."""
    original = ORIGINALS["fairseq.options.parse_args_and_arch"]
    argv = sys.argv[1:] if input_args is None else list(input_args)
    if suppress_defaults or not any(flag in argv for flag in HELP_FLAGS):
        return original(parser, input_args, parse_known, suppress_defaults, modify_parser)
    rest = [a for a in argv if a not in HELP_FLAGS]
    # a stand-in for the data directory, which the task makes a required positional argument
    original(parser, rest + ["DATA"], True, False, modify_parser)
    parser.print_help()
    parser.exit()


def task_options_in_help() -> None:
    """`fairseq-generate --task mue_caption --help` lists the task's options.

    Breaks: fairseq adds the options of the chosen task, model and criterion to its parser only after
    a first parse, and argparse answers -h/--help during that first parse, so the help of every
    fairseq CLI lacks them: a user cannot find --img-thres, --dec-decay-len or --eval-results there.
    Fix: wrap `fairseq.options.parse_args_and_arch`; when -h/--help is given, run it without the flag
    (and with a stand-in data directory) so that it adds every option, then print the help and exit 0.
    Without -h/--help the original runs unchanged.
    """
    from fairseq import options

    _replace(options, "parse_args_and_arch", _parse_args_and_arch_with_full_help)


def apply() -> None:
    """Install every patch once; later calls do nothing."""
    global _APPLIED
    if _APPLIED:
        return
    allow_fairseq_checkpoint_globals()
    keep_last_partial_batch()
    cpu_safe_ddp()
    cpu_safe_torchrun()
    quiet_root_logger()
    one_line_user_errors()
    task_options_in_help()
    _APPLIED = True
