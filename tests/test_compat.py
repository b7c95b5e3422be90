"""Each mue.compat patch fixes the failure it documents; the originals still show that failure.

The one-line user errors (patch 5) are tested in tests/test_errors.py.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mue import compat

compat.apply()

from fairseq import checkpoint_utils, options  # noqa: E402
from fairseq.data import data_utils  # noqa: E402
from fairseq.dataclass.configs import DistributedTrainingConfig  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.distributed import utils as distributed_utils  # noqa: E402
from fairseq.models import DistributedFairseqModel  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


class NotAllowListed:
    """A class no allow-list names: weights_only loading must still refuse it."""

    def __init__(self, value):
        self.value = value


# ---------------------------------------------------------------- 1. checkpoints


def _fairseq_style_state():
    """A checkpoint as fairseq writes/upgrades them: Namespace args, DictConfig cfg, numpy metrics."""
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        ["/nonexistent", "--task", "translation", "--arch", "transformer", "--cpu",
         "--optimizer", "adam", "--lr", "0.001", "--encoder-layers", "1"],
    )
    cfg = convert_namespace_to_omegaconf(args)
    assert isinstance(cfg, DictConfig)
    return {
        "args": args,
        "cfg": cfg,
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": np.float64(2.5)},
                               "num_updates": np.int64(3)}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0},
                        "val_loss": np.float64(2.5)},
    }


def test_fairseq_loader_reads_namespace_and_dictconfig_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint_utils.torch_persistent_save(_fairseq_style_state(), path)
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    assert state["args"].arch == "transformer"
    assert state["cfg"].model.encoder_layers == 1
    assert torch.equal(state["model"]["w"], torch.arange(6.0).view(2, 3))
    assert state["extra_state"]["val_loss"] == 2.5
    assert state["optimizer_history"][-1]["num_updates"] == 3


def test_allow_list_is_what_makes_weights_only_loading_pass(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(_fairseq_style_state(), path)
    assert torch.load(path, weights_only=True)["args"].arch == "transformer"
    saved = torch.serialization.get_safe_globals()
    try:
        torch.serialization.clear_safe_globals()
        with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace|omegaconf"):
            torch.load(path, weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_untrusted_globals_still_refused_and_legacy_loader_reads_them(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotAllowListed(7)}, path)
    with pytest.raises(pickle.UnpicklingError, match="NotAllowListed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    state = compat.load_legacy_checkpoint(path)
    assert state["extra"].value == 7 and torch.equal(state["model"]["w"], torch.ones(2))
    with compat.trusted_pickle_loading():
        assert torch.load(path)["extra"].value == 7
    with pytest.raises(pickle.UnpicklingError):  # the trust ends with the block
        torch.load(path)


def test_legacy_loader_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        compat.load_legacy_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- 2. last partial batch


def _check_exact_cover(batches, n):
    flat = np.concatenate([np.asarray(b) for b in batches]).tolist()
    assert sorted(flat) == list(range(n)), "every index exactly once"


def test_batch_by_size_keeps_last_partial_batch():
    kwargs = dict(max_sentences=8, required_batch_size_multiple=8)
    batches = data_utils.batch_by_size(np.arange(50), lambda i: 5, **kwargs)
    _check_exact_cover(batches, 50)
    assert [len(b) for b in batches] == [8] * 6 + [2]
    original = compat.ORIGINALS["fairseq.data.data_utils.batch_by_size"]
    dropped = original(np.arange(50), lambda i: 5, **kwargs)
    assert sum(len(b) for b in dropped) == 48  # the upstream bug this patch fixes


def test_batch_by_size_leftover_respects_token_limit():
    rng = np.random.RandomState(2)  # a draw whose last batch (3 rows) is not a multiple of 4
    sizes = rng.randint(1, 30, size=53)
    order = rng.permutation(53)
    args = (order, lambda i: int(sizes[i]), sizes[order], 100, 8, 4)
    batches = data_utils.batch_by_size(*args)
    _check_exact_cover(batches, 53)
    assert all(len(b) <= 8 and sizes[b].max() * len(b) <= 100 for b in batches)
    original = compat.ORIGINALS["fairseq.data.data_utils.batch_by_size"]
    assert sum(len(b) for b in original(*args)) < 53


# ---------------------------------------------------------------- 3. distributed on the CPU


def _dist_cfg(**overrides):
    """fairseq's distributed_training config with its ${common.*} interpolations resolved."""
    fields = dict(tpu=False, fp16=False, memory_efficient_fp16=False)
    fields.update(overrides)
    return DistributedTrainingConfig(**fields)


@pytest.fixture
def gloo_world(tmp_path):
    """A one-process gloo group, as fairseq has after distributed_init with --cpu."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1, "another test left a multi-process group"
        yield dist.group.WORLD
        return
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_pytorch_ddp_wrapper_builds_on_cpu(gloo_world):
    args = _dist_cfg(ddp_backend="pytorch_ddp", device_id=0)
    wrapped = DistributedFairseqModel(args, nn.Linear(3, 2), process_group=gloo_world,
                                      device=torch.device("cpu"))
    assert isinstance(wrapped.module, torch.nn.parallel.DistributedDataParallel)
    assert wrapped.module.device_ids is None
    wrapped(torch.ones(4, 3)).sum().backward()
    assert wrapped.weight.grad is not None and torch.allclose(wrapped.weight.grad, torch.full((2, 3), 4.0))
    original = compat.ORIGINALS["fairseq.models.distributed_fairseq_model.DistributedDataParallel"]
    with pytest.raises(ValueError, match="device_ids"):  # what fairseq's call does unpatched
        original(nn.Linear(3, 2), device_ids=[0], output_device=0, process_group=gloo_world)


def _torchrun_env(monkeypatch, world_size, rank, cuda_devices):
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                       "WORLD_SIZE": str(world_size), "RANK": str(rank)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)


def test_torchrun_without_cuda_gets_device_zero(monkeypatch):
    _torchrun_env(monkeypatch, world_size=2, rank=1, cuda_devices=0)
    cfg = _dist_cfg(distributed_world_size=2)
    distributed_utils.infer_init_method(cfg)
    assert (cfg.distributed_init_method, cfg.distributed_world_size, cfg.distributed_rank) == ("env://", 2, 1)
    assert cfg.device_id == 0 and cfg.distributed_no_spawn and cfg.distributed_backend == "gloo"
    original = compat.ORIGINALS["fairseq.distributed.utils._infer_torch_distributed_launch_init"]
    with pytest.raises(ZeroDivisionError):
        original(_dist_cfg(distributed_world_size=2))


def test_torchrun_with_cuda_keeps_fairseq_behaviour(monkeypatch):
    _torchrun_env(monkeypatch, world_size=4, rank=3, cuda_devices=2)
    cfg = _dist_cfg(distributed_world_size=4)
    distributed_utils._infer_torch_distributed_launch_init(cfg)
    assert cfg.device_id == 1 and cfg.distributed_backend == "nccl" and cfg.distributed_rank == 3


def test_torchrun_without_world_size_is_a_clear_error(monkeypatch):
    _torchrun_env(monkeypatch, world_size=2, rank=0, cuda_devices=0)
    cfg = _dist_cfg(distributed_world_size=1)
    with pytest.raises(ValueError, match="--distributed-world-size 2"):
        distributed_utils.infer_init_method(cfg)
    original = compat.ORIGINALS["fairseq.distributed.utils.infer_init_method"]
    original(cfg)  # upstream: returns quietly and the rank trains alone
    assert cfg.distributed_init_method is None


# ---------------------------------------------------------------- --help


def test_help_lists_the_tasks_options(tmp_path, capsys):
    """fairseq answers --help before it adds the task's options; the patch prints it after."""
    from fairseq import options

    argv = ["--task", "mue_caption", "--help"]
    original = compat.ORIGINALS["fairseq.options.parse_args_and_arch"]
    for parse, has_task_options in ((original, False), (options.parse_args_and_arch, True)):
        with pytest.raises(SystemExit) as done:
            parse(options.get_generation_parser(), argv)
        assert done.value.code == 0
        assert ("--img-thres" in capsys.readouterr().out) == has_task_options


# ---------------------------------------------------------------- apply()


def test_apply_twice_is_harmless():
    patched = {key: obj for key, obj in compat.ORIGINALS.items()}
    current = (data_utils.batch_by_size, distributed_utils.infer_init_method,
               distributed_utils._infer_torch_distributed_launch_init, sys.excepthook)
    n_globals = len(torch.serialization.get_safe_globals())
    compat.apply()
    compat._APPLIED = False  # force every patch function to run again
    compat.apply()
    assert compat.ORIGINALS == patched and len(patched) >= 8  # the six of sections 1-6, section 9's two
    assert {"fairseq.utils.import_user_module", "fairseq_cli.generate.main"} <= set(patched)
    assert (data_utils.batch_by_size, distributed_utils.infer_init_method,
            distributed_utils._infer_torch_distributed_launch_init, sys.excepthook) == current
    assert len(torch.serialization.get_safe_globals()) == n_globals
    for key, original in compat.ORIGINALS.items():
        assert getattr(original, "_mue_original", None) is None, f"{key} wrapped twice"
    batches = data_utils.batch_by_size(np.arange(10), lambda i: 1, max_sentences=4,
                                       required_batch_size_multiple=4)
    _check_exact_cover(batches, 10)


def test_quiet_root_logger_undoes_fairseqs_debug_root(monkeypatch):
    import logging

    from mue import compat

    root = logging.getLogger()
    old = root.level
    try:
        monkeypatch.delenv("LOGLEVEL", raising=False)
        root.setLevel(logging.DEBUG)  # what `import fairseq` leaves behind
        compat.quiet_root_logger()
        assert root.level == logging.INFO
        monkeypatch.setenv("LOGLEVEL", "DEBUG")  # a user who asks for DEBUG keeps it
        root.setLevel(logging.DEBUG)
        compat.quiet_root_logger()
        assert root.level == logging.DEBUG
        root.setLevel(logging.WARNING)  # a level somebody chose on purpose is left alone
        compat.quiet_root_logger()
        assert root.level == logging.WARNING
    finally:
        root.setLevel(old)


def test_import_fairseq_leaves_a_debug_root_logger_that_import_mue_puts_back():
    """The upstream behaviour (needs a fresh process: basicConfig acts only on a root without handlers)."""
    code = ("import logging; import fairseq; before = logging.getLogger().level; import mue; "
            "print(before, logging.getLogger().level)")
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["10", "20"]  # DEBUG after `import fairseq`, INFO after `import mue`
