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
8. Crash-safe checkpoints and distributed loading (tests in tests/test_resume.py, tests/test_distributed.py):
   `crash_safe_checkpoints` (checkpoint_last.pt / checkpoint_best.pt copied atomically: temporary file,
   fsync, os.replace), `resume_from_intact_checkpoint` (a damaged checkpoint_last.pt: resume from the
   newest intact checkpoint with a warning naming both, or one line saying what to do; any unreadable
   checkpoint, or an optimizer state of other trainable parameters, is an error naming the file),
   `finished_run_stays_finished` (restarting a run that reached
   --max-update trains nothing; installed at the checkpoint load), and `_TensorPlaceholder` in patch 1's
   allow-list (rank 0 broadcasts the loaded checkpoint as a pickle that the other ranks load).
9. Use from an installed package: `quiet_third_party_imports` (fairseq's import-time FutureWarnings and
   tensorboardX line; run first), `one_plugin_copy` (--user-dir to another copy of an imported mue),
   `checkpoint_task_options` (fairseq-generate takes the task options a checkpoint needs from the
   checkpoint; a contradicting option is a one-line error).

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
import shutil
import sys
import typing

import numpy as np
import torch

from mue.errors import UserError, user_message

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
    - fairseq's `_TensorPlaceholder` (a frozen dataclass holding one int): in multi-process training
      rank 0 reads the checkpoint and `distributed_utils.broadcast_object` sends it to the other ranks
      as a pickle with each tensor replaced by a placeholder, which those ranks `torch.load` (section 8).
    All of these only build data; none runs code chosen by the file.
    """
    from fairseq.distributed.utils import _TensorPlaceholder
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
        _TensorPlaceholder,
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


# --------------------------------------------------------------------------------------------
# 8. crash-safe checkpoints and distributed loading
# --------------------------------------------------------------------------------------------


class DamagedCheckpointError(UserError):
    """A checkpoint file cannot be read (truncated, half-written, not a checkpoint); the message names it."""


class OptimizerStateMismatchError(UserError):
    """A checkpoint's optimizer state does not fit the trainable parameters; the message names the file."""


def _fsync_directory(path: str) -> None:
    """Make a rename inside directory `path` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path):
    """Write `path` all at once: yields `path + ".tmp"` opened for binary writing, then flushes, fsyncs
    and `os.replace`s it onto `path`. An error or a kill before the rename leaves `path` as it was (a
    leftover `.tmp` is overwritten by the next write); an error removes the temporary file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """fairseq's PathManager.copy for local files, through `atomic_output`."""
    from fairseq.file_io import PathManager

    if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
        return PathManager.copy(src_path, dst_path, overwrite=overwrite)
    if not overwrite and os.path.exists(dst_path):
        return False
    with open(src_path, "rb") as src, atomic_output(dst_path) as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    return True


def _torch_persistent_save_durable(obj, filename, async_write: bool = False):
    """fairseq's torch_persistent_save, with the temporary file fsynced before its rename."""
    from fairseq.file_io import PathManager

    if async_write or not PathManager.supports_rename(filename):
        return ORIGINALS["fairseq.checkpoint_utils.torch_persistent_save"](obj, filename, async_write)
    with atomic_output(filename) as f:
        torch.save(obj, f)


def crash_safe_checkpoints() -> None:
    """Checkpoint files are either the old or the new file, never a part of one.

    Breaks: fairseq-train writes the first checkpoint of a save (e.g. checkpoint_1_40.pt) to a
    `.tmp` file and renames it, but fills the others (checkpoint_best.pt, checkpoint_last.pt) with
    `PathManager.copy`, a plain `shutil.copyfile` onto the old file: killed during that copy (OOM
    killer, job time limit, Ctrl-C twice), checkpoint_last.pt stays truncated and every later resume
    fails. The renamed file is not fsynced either, so after a power loss the rename may point at
    unwritten data.
    Fix: `fairseq.checkpoint_utils` gets a PathManager subclass whose `copy` of local files goes
    through `atomic_output` (copy into `DST.tmp` in the same folder, fsync, os.replace, fsync the
    folder), and a `torch_persistent_save` that saves through `atomic_output` as well. Remote paths
    (iopath handlers) and --write-checkpoints-asynchronously keep fairseq's code.
    """
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    class CrashSafePathManager(PathManager):
        """fairseq's PathManager, with `copy` made atomic for local files (mue.compat)."""

        copy = staticmethod(_atomic_copy)

    _replace(checkpoint_utils, "PathManager", CrashSafePathManager)
    _replace(checkpoint_utils, "torch_persistent_save", _torch_persistent_save_durable)


def _first_line(err: BaseException) -> str:
    """The first sentence of an error message (torch's go on with advice that does not fit one line)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__


def _is_damage(err: BaseException) -> bool:
    """Whether a torch.load error means the bytes are incomplete or not a checkpoint (rather than a
    refused global, a missing file or a bug)."""
    import pickle
    import zipfile

    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        return "Weights only load failed" not in text
    if isinstance(err, (EOFError, zipfile.BadZipFile)):
        return True
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "unexpected EOF"))


def read_checkpoint_header(path: str):
    """(state, None) with the tensors memory-mapped, not read, or (None, why) when `path` is damaged."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True), None
        except RuntimeError as err:
            if "mmap" not in str(err):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu"), None
    except Exception as err:  # noqa: BLE001
        if _is_damage(err):
            return None, _first_line(err)
        raise


def newest_intact_checkpoint(save_dir: str, suffix: str = "", exclude: str = ""):
    """(path, updates) of the readable checkpoint*{suffix}.pt in `save_dir` (other than `exclude`) that holds
    the most updates (ties: the most recently written), or (None, None)."""
    import re

    pattern = re.compile(r"checkpoint.*" + re.escape(suffix) + r"\.pt")
    best, best_key = None, (None, None)
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if not pattern.fullmatch(name) or _same_file(path, exclude) or not os.path.isfile(path):
            continue
        try:
            state, why = read_checkpoint_header(path)
        except Exception as err:  # noqa: BLE001  (e.g. a trusted old pickle: not one of this run's)
            state, why = None, _first_line(err)
        if state is None:
            logger.warning("%s cannot be read either (%s)", path, why)
            continue
        history = (state.get("optimizer_history") if isinstance(state, dict) else None) or [{}]
        key = (history[-1].get("num_updates", -1), os.path.getmtime(path))
        if best is None or key > best_key:
            best, best_key = path, key
    return best, best_key[0]


def _same_file(a: str, b: str) -> bool:
    return bool(b) and os.path.abspath(a) == os.path.abspath(b)


def _load_checkpoint_to_cpu_naming_damage(path, arg_overrides=None, load_on_all_ranks=False):
    """fairseq's load_checkpoint_to_cpu; a file that cannot be read is a DamagedCheckpointError naming it."""
    try:
        return ORIGINALS["fairseq.checkpoint_utils.load_checkpoint_to_cpu"](path, arg_overrides, load_on_all_ranks)
    except Exception as err:  # noqa: BLE001
        if not _is_damage(err):
            raise
        raise DamagedCheckpointError(
            f"{path} is damaged or not a checkpoint ({_first_line(err)}); use an intact checkpoint") from err


def _train_epoch_unless_finished(cfg, trainer, task, epoch_itr):
    """fairseq_cli.train.train (one epoch), or nothing when the run already reached --max-update."""
    max_update = cfg.optimization.max_update
    if max_update and trainer.get_num_updates() >= max_update:
        logger.info("the checkpoint already holds %d updates (--max-update %d): nothing left to train",
                    trainer.get_num_updates(), max_update)
        return [None], True
    return ORIGINALS["fairseq_cli.train.train"](cfg, trainer, task, epoch_itr)


def finished_run_stays_finished() -> None:
    """Restarting a run that already reached --max-update trains nothing.

    Breaks: fairseq-train checks --max-update only after an update, so the same command started again
    after the run finished (by hand, or by a job scheduler restarting a job killed after its last save)
    resumes from checkpoint_last.pt, trains one more update and overwrites the final checkpoint.
    Fix: wrap `fairseq_cli.train.train` (one epoch; looked up when called): when the trainer already holds
    --max-update updates, it returns "stop" at once, as fairseq does after the last update. Installed when
    fairseq-train loads its checkpoint (`_load_checkpoint_or_newest_intact`), not by `apply()`: importing
    fairseq_cli.train runs its logging.basicConfig, which must happen when fairseq-train starts (mue.cli).
    """
    train = sys.modules.get("fairseq_cli.train")
    if train is not None:
        _replace(train, "train", _train_epoch_unless_finished)


def _load_checkpoint_or_newest_intact(cfg, trainer, **passthrough_args):
    """fairseq's checkpoint_utils.load_checkpoint, resuming from the newest intact checkpoint when the
    automatic one (SAVE_DIR/checkpoint_last.pt) is damaged; an optimizer state saved for other trainable
    parameters is a one-line error naming the file."""
    original = ORIGINALS["fairseq.checkpoint_utils.load_checkpoint"]
    from fairseq.file_io import PathManager

    finished_run_stays_finished()  # fairseq-train is running: fairseq_cli.train is imported

    last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
    instead = None
    if (cfg.restore_file == "checkpoint_last.pt" and not PathManager.path_requires_pathmanager(last)
            and os.path.isfile(last)):
        _, why = read_checkpoint_header(last)
        if why is not None:
            instead, updates = newest_intact_checkpoint(cfg.save_dir, trainer.checkpoint_suffix, exclude=last)
            if instead is None:
                raise DamagedCheckpointError(
                    f"{last} is damaged ({why}) and no intact checkpoint lies beside it: delete it to start "
                    f"afresh, or resume from another checkpoint with --restore-file FILE")
            logger.warning("%s is damaged (%s); resuming from %s (%s updates), the newest intact checkpoint "
                           "beside it", last, why, instead, updates)
    load = trainer.load_checkpoint

    def load_checked(filename, *args, **kwargs):
        if instead is not None and _same_file(filename, last):
            filename = instead
        try:
            return load(filename, *args, **kwargs)
        except ValueError as err:
            if "doesn't match the size of optimizer's group" not in str(err):
                raise
            raise OptimizerStateMismatchError(
                f"{filename}: its optimizer state was saved for another set of trainable parameters (for "
                f"instance before mue stopped training OFA's unused image-generation parameters): resume "
                f"with --reset-optimizer, which keeps the weights, the learning-rate schedule and the data "
                f"position") from err

    trainer.load_checkpoint = load_checked  # this call only: fairseq asks the trainer to load the file
    try:
        return original(cfg, trainer, **passthrough_args)
    finally:
        del trainer.load_checkpoint


def resume_from_intact_checkpoint() -> None:
    """A damaged checkpoint_last.pt does not end the run, and a damaged file is named.

    Breaks: fairseq-train resumes from SAVE_DIR/checkpoint_last.pt whenever it exists; a truncated one
    (left by a kill during fairseq's plain copy, see `crash_safe_checkpoints`, or by a full disk) fails
    every restart with "PytorchStreamReader failed reading zip archive" or an EOFError that names no
    file, although intact checkpoint_*.pt files lie beside it.
    Fix: (a) wrap `checkpoint_utils.load_checkpoint` (called by fairseq-train on every rank): when
    checkpoint_last.pt is the file to resume from and cannot be read (pickle read with the tensors
    memory-mapped: cheap), resume from the intact checkpoint*.pt of that folder with the most updates,
    with a warning naming both files; with none, stop with a DamagedCheckpointError (one line) saying
    what to do. (b) wrap `checkpoint_utils.load_checkpoint_to_cpu`: a file that cannot be read
    (--restore-file, --finetune-from-model, fairseq-generate --path) is a DamagedCheckpointError naming
    it. Errors that are not about the bytes (a refused global, a missing file) pass unchanged. (c) An
    optimizer state saved for another set of trainable parameters (torch: "loaded state dict contains a
    parameter group that doesn't match the size of optimizer's group", no file named) is an
    OptimizerStateMismatchError naming the file and --reset-optimizer.
    """
    from fairseq import checkpoint_utils

    _replace(checkpoint_utils, "load_checkpoint", _load_checkpoint_or_newest_intact)
    _replace(checkpoint_utils, "load_checkpoint_to_cpu", _load_checkpoint_to_cpu_naming_damage)


# --------------------------------------------------------------------------------------------
# 9. use from an installed package: quiet imports, one copy of the plugin, checkpoints that carry
#    their task
# --------------------------------------------------------------------------------------------

#: (category, message regex) of the warnings that importing fairseq 0.12 on torch 2.14 raises: fairseq
#: decorates functions with torch.jit.script at import. Ignored only while the plugin imports fairseq.
IMPORT_WARNINGS = ((FutureWarning, r"`torch\.jit\.script` is deprecated"),)
#: FutureWarnings attributed to fairseq's own modules (e.g. its torch.cuda.amp.autocast(...) calls in every
#: training step): about fairseq's code, which a user cannot change. Filtered for good, by module.
FAIRSEQ_MODULES = r"fairseq(_cli)?(\.|$)"
#: (logger, message part) of log lines fairseq prints at import about packages mue does not use
IMPORT_LOG_LINES = (("fairseq.tasks.text_to_speech", "Please install tensorboardX"),)


class _DropMessages(logging.Filter):
    """Drop a logger's records whose message contains one of `parts`."""

    def __init__(self, parts):
        super().__init__()
        self.parts = tuple(parts)

    def filter(self, record):
        return not any(part in record.getMessage() for part in self.parts)


def quiet_third_party_imports() -> None:
    """Importing the plugin does not print fairseq's import-time noise.

    Breaks: `import fairseq` on torch 2.14 prints five FutureWarnings ("`torch.jit.script` is
    deprecated", raised by fairseq's own decorators) and "Please install tensorboardX" (a speech task's
    import-time log line), before anything of ours, in every process; and every training step warns that
    fairseq's `torch.cuda.amp.autocast(...)` call is deprecated.
    Fix: import fairseq once here with those import warnings ignored inside `warnings.catch_warnings()`,
    so the filter ends with the import and a user's own torch.jit.script calls still warn; a logging
    filter on that one logger for that one message; and FutureWarnings attributed to fairseq's own
    modules (FAIRSEQ_MODULES) ignored, which leaves the user's code and other packages untouched. Must
    run before anything imports fairseq: first in `apply()`. A fairseq command started without mue's
    entry points (`fairseq-generate --user-dir`) imports fairseq before the plugin and still prints the
    import-time ones; `mue-generate` & co. (mue.cli) do not.
    """
    import warnings

    for name, _ in IMPORT_LOG_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(p for n, p in IMPORT_LOG_LINES if n == name))
    warnings.filterwarnings("ignore", category=FutureWarning, module=FAIRSEQ_MODULES)
    root = logging.getLogger()
    before = list(root.handlers)
    with warnings.catch_warnings():
        for category, message in IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        import fairseq  # noqa: F401  (fairseq.__init__ imports its models and tasks: the noisy part)
    FAIRSEQ_IMPORT_HANDLERS[:] = [h for h in root.handlers if h not in before]


#: root-logger handlers that importing fairseq installed here (its wav2vec2 module's basicConfig, see
#: quiet_root_logger); mue's entry points (mue.cli) remove them so that each fairseq tool configures its
#: logging as written (fairseq-train: timestamped lines on stdout)
FAIRSEQ_IMPORT_HANDLERS: list = []


def _same_directory(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _import_user_module_once(args):
    """fairseq's import_user_module, except for a --user-dir that is another copy of the imported mue."""
    original = ORIGINALS["fairseq.utils.import_user_module"]
    user_dir = getattr(args, "user_dir", None)
    loaded = sys.modules.get(__name__.split(".")[0])
    if user_dir and loaded is not None:
        path = os.path.abspath(user_dir)
        if os.path.isdir(path) and os.path.basename(os.path.normpath(path)) == loaded.__name__:
            here = list(loaded.__path__)
            if any(_same_directory(path, p) for p in here):
                return None  # this very plugin, maybe reached through another path or a symlink
            if os.path.isfile(os.path.join(path, "__init__.py")):
                logger.warning("--user-dir %s: the plugin %r is already imported from %s and is used; Python "
                               "cannot import a second module of that name", path, loaded.__name__, here[0])
                return None
    return original(args)


def one_plugin_copy() -> None:
    """`import mue` followed by a fairseq command with `--user-dir` to another copy of mue works.

    Breaks: fairseq imports --user-dir DIR as the module named basename(DIR). When mue is already imported
    (`import mue` in a script, or mue's own entry points) and DIR is another copy (the clone, while the
    installed package was imported) or the same directory through a symlink, fairseq stops with "module
    name (mue) is not globally unique".
    Fix: wrap `fairseq.utils.import_user_module`: a --user-dir that is the imported plugin's directory is
    done; one that is another copy of mue (a folder named mue with an __init__.py) keeps the imported
    one, with a warning naming both. Anything else goes to fairseq unchanged.
    """
    from fairseq import utils

    _replace(utils, "import_user_module", _import_user_module_once)


def saved_task_config(path: str) -> typing.Optional[dict]:
    """The task config checkpoint `path` was trained with ({"_name": task, option: value}), or None when
    the file holds none or cannot be read the safe way (fairseq's own loading then reports why).
    Tensors are memory-mapped where the file format allows, so this does not read the weights."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001
        logger.debug("%s: no task config read (%s)", path, err)
        return None
    if not isinstance(state, dict):
        return None
    cfg, args = state.get("cfg"), state.get("args")
    if cfg is not None and cfg.get("task") is not None:
        task = cfg["task"]
        if not isinstance(task, dict):
            from omegaconf import OmegaConf

            task = OmegaConf.to_container(task) if OmegaConf.is_config(task) else vars(task)
        return dict(task)
    if isinstance(args, argparse.Namespace):  # fairseq's older layout
        return dict(vars(args), _name=getattr(args, "task", None))
    return None


#: fairseq-generate's task when --task is not given
DEFAULT_GENERATE_TASK = "translation"
#: what take_task_from_checkpoints did, for the log: fairseq-generate configures logging only after it, so
#: the task logs these lines when it is set up (mue.tasks.vl_task)
NOTES: list = []


def _task_node(name: str, data) -> "omegaconf.DictConfig":
    """A fresh task config of registered task `name` with its defaults and `data`."""
    import dataclasses
    import enum

    from fairseq.tasks import TASK_DATACLASS_REGISTRY
    from omegaconf import OmegaConf

    values = {}
    for f in dataclasses.fields(TASK_DATACLASS_REGISTRY[name]):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        values[f.name] = value.value if isinstance(value, enum.Enum) else value
    values.update(_name=name, data=data)
    return OmegaConf.create(values)


def take_task_from_checkpoints(cfg) -> None:
    """Complete fairseq-generate's config `cfg` (DictConfig) with what its checkpoints were trained with.

    For each --path checkpoint trained with a task that has the hook `adopt_checkpoint_options` (mue's
    tasks, mue.tasks.vl_task): the options it needs to be rebuilt that the command line left out are taken
    from it, and one the command line gives differently is an OptionError naming both values. Without
    --task (fairseq's default task, translation), the checkpoint's task is used; a --task of ours unlike
    the checkpoint's is an OptionError. --model-overrides entries that name task options win over the
    checkpoint, as they do in fairseq's own loading.
    """
    import ast

    from fairseq import checkpoint_utils, utils
    from fairseq.tasks import TASK_REGISTRY

    from mue.errors import OptionError

    NOTES.clear()
    if cfg.common_eval.path is None:
        return
    overrides = ast.literal_eval(cfg.common_eval.model_overrides or "{}")
    origin = {}
    for path in utils.split_paths(cfg.common_eval.path):
        filename = checkpoint_utils.get_maybe_sharded_checkpoint_filename(
            path, cfg.checkpoint.checkpoint_suffix, 0, cfg.checkpoint.checkpoint_shard_count)
        saved = saved_task_config(filename) if os.path.isfile(filename) else None
        trained = (saved or {}).get("_name")
        hook = getattr(TASK_REGISTRY.get(trained), "adopt_checkpoint_options", None)
        if hook is None:
            continue
        saved.update({k: v for k, v in overrides.items() if k in saved})
        name = cfg.task._name
        if name != trained:
            if name == DEFAULT_GENERATE_TASK and not origin:
                NOTES.append(f"--task {trained}: from {filename}")
                cfg.task = _task_node(trained, cfg.task.data)
            else:
                raise OptionError(f"--task {name}: {filename} was trained with --task {trained}")
        taken = hook(cfg.task, saved, filename, origin)
        if taken:
            NOTES.append(f"task options from {filename}: "
                         + " ".join(f"--{n.replace('_', '-')} {cfg.task[n]}" for n in taken))


def _generate_main_with_checkpoint_task(cfg):
    """fairseq_cli.generate.main, with the task options completed from the checkpoints first."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    if isinstance(cfg, argparse.Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    take_task_from_checkpoints(cfg)
    return ORIGINALS["fairseq_cli.generate.main"](cfg)


def checkpoint_task_options() -> None:
    """`fairseq-generate DATA --path ckpt.pt` rebuilds the model the checkpoint holds.

    Breaks: fairseq-generate sets the task up from the command line alone (`tasks.setup_task(cfg.task)`)
    before it reads the checkpoint, so a checkpoint trained with `--num-codes 0 --num-bins 0
    --patch-image-size 64` fails with a shape mismatch unless the user repeats those options, and without
    the image size it silently runs at 480 px.
    Fix: wrap `fairseq_cli.generate.main` (fairseq-generate's and mue.evaluation.sweep's entry; looked up
    when called): `take_task_from_checkpoints` reads each checkpoint's saved task config first (weights
    memory-mapped) and fills in the options the task's hook names. What the user typed is known from the
    config itself: those task options default to None, "not given" (see mue.tasks.vl_task). Not covered:
    `python -m fairseq_cli.generate` (a second module object) and fairseq-interactive.
    """
    from fairseq_cli import generate

    _replace(generate, "main", _generate_main_with_checkpoint_task)


def apply() -> None:
    """Install every patch once; later calls do nothing."""
    global _APPLIED
    if _APPLIED:
        return
    quiet_third_party_imports()  # first: before anything imports fairseq
    allow_fairseq_checkpoint_globals()
    keep_last_partial_batch()
    cpu_safe_ddp()
    cpu_safe_torchrun()
    quiet_root_logger()
    one_line_user_errors()
    task_options_in_help()
    crash_safe_checkpoints()
    resume_from_intact_checkpoint()
    one_plugin_copy()
    checkpoint_task_options()
    _APPLIED = True
