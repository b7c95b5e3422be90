"""Resuming fairseq-train from checkpoint_last.pt continues the same run.

Run A trains 4 updates (checkpoints every 2) and stops; run B restarts in A's save dir (fairseq's default
--restore-file checkpoint_last.pt) with --max-update 6; run C trains 6 updates without a stop. Same seed,
--num-workers 0, one intra-op thread, dropout and drop-path on. With 12 training rows in batches of 4
(3 updates an epoch), A stops one batch into epoch 2, so B must restore the epoch's shuffled order and skip
the batch already done. Checked: B starts at update 4 in that position, its trainer holds A's Adam state
(exp_avg, exp_avg_sq, step) exactly, and B ends bit-identical to C (parameters and optimizer state).
Bit-exactness holds because fairseq reseeds torch with seed + num_updates before every step and the
dataset draws its randomness from (seed, epoch, index), so nothing depends on the process's history.
"""
import copy
import logging

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

import mue  # noqa: F401  (registration and checkpoint-loading compat)

TINY = ["--arch", "mue_ofa_micro", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--patch-image-size", "32", "--num-codes", "0", "--num-bins", "0",
        "--dropout", "0.1", "--encoder-drop-path-rate", "0.1", "--decoder-drop-path-rate", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("resume_data")
    generate(str(root), num_train=4, num_valid=1, num_test=1, image_size=32)  # 12 SNLI-VE training rows
    return root / "snli_ve"



@pytest.fixture
def loads(monkeypatch):
    """Record, for every Trainer.load_checkpoint call, the state the trainer holds right after it."""
    calls = []
    original = Trainer.load_checkpoint

    def recording(self, filename, *args, **kwargs):
        extra_state = original(self, filename, *args, **kwargs)
        calls.append({"file": filename, "extra_state": copy.deepcopy(extra_state),
                      "num_updates": self.get_num_updates(),
                      "optimizer": copy.deepcopy(self.optimizer.state_dict()) if extra_state else None})
        return extra_state

    monkeypatch.setattr(Trainer, "load_checkpoint", recording)
    return calls


def train(data_dir, save_dir, max_update, *extra):
    from fairseq_cli import train as fairseq_train

    argv = [str(data_dir), "--task", "mue_snli_ve", *TINY, *extra, "--criterion", "mue", "--optimizer", "adam",
            "--lr", "1e-3", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "2",
            "--total-num-update", "6", "--batch-size", "4", "--required-batch-size-multiple", "1",
            "--max-update", str(max_update), "--save-interval-updates", "2", "--no-epoch-checkpoints",
            "--save-dir", str(save_dir), "--seed", "5", "--cpu", "--num-workers", "0", "--no-progress-bar"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    fairseq_train.main(cfg)
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")


def assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: different keys"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max |diff| " \
                                            f"{(a[key].double() - b[key].double()).abs().max().item():.3g})"


def assert_same_adam_state(a: dict, b: dict, what: str):
    assert a["state"].keys() == b["state"].keys() and a["state"], f"{what}: different or empty Adam state"
    for index in a["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][index][name], b["state"][index][name]), f"{what}: {name} of param {index}"
        assert a["state"][index]["step"] == b["state"][index]["step"], f"{what}: step of param {index}"


def test_resume_continues_and_matches_an_uninterrupted_run(data, tmp_path, loads, one_thread, caplog):
    stopped = train(data, tmp_path / "ab", max_update=4)
    assert stopped["optimizer_history"][-1]["num_updates"] == 4
    position = stopped["extra_state"]["train_iterator"]
    assert (position["epoch"], position["iterations_in_epoch"]) == (2, 1), "the stop is not one batch into epoch 2"
    saved_optimizer = copy.deepcopy(stopped["last_optimizer_state"])

    with caplog.at_level(logging.INFO):
        resumed = train(data, tmp_path / "ab", max_update=6)
    restart = loads[-1]
    assert restart["file"].endswith("checkpoint_last.pt") and restart["extra_state"] is not None
    assert restart["num_updates"] == 4, "the restart did not continue at update 4"
    assert restart["extra_state"]["train_iterator"]["iterations_in_epoch"] == 1
    assert "epoch 2 @ 4 updates" in caplog.text
    assert_same_adam_state(restart["optimizer"], saved_optimizer, "optimizer state after loading")
    assert resumed["optimizer_history"][-1]["num_updates"] == 6

    uninterrupted = train(data, tmp_path / "c", max_update=6)
    assert loads[-1]["extra_state"] is None  # run C started fresh
    assert uninterrupted["optimizer_history"][-1]["num_updates"] == 6
    assert_same_tensors(resumed["model"], uninterrupted["model"], "model after 4 + 2 vs 6 updates")
    assert_same_adam_state(resumed["last_optimizer_state"], uninterrupted["last_optimizer_state"],
                           "optimizer after 4 + 2 vs 6 updates")
    # and the run did train: the parameters moved between update 4 and update 6
    assert any(not torch.equal(stopped["model"][k], resumed["model"][k]) for k in stopped["model"])


# ------------------------------------------------------------------ damaged checkpoints (mue.compat section 8)


def truncate(path, keep: float = 0.5):
    """Cut `path` to a fraction of its bytes: what a kill during a plain copy leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_checkpoint_last_resumes_from_the_newest_intact_checkpoint(data, tmp_path, loads, one_thread,
                                                                            caplog):
    stopped = train(data, tmp_path / "ab", max_update=4)  # also writes checkpoint_1_2.pt, checkpoint_2_4.pt
    last = tmp_path / "ab" / "checkpoint_last.pt"
    truncate(last)
    with caplog.at_level(logging.WARNING):
        resumed = train(data, tmp_path / "ab", max_update=6)
    restart = loads[-1]
    assert not restart["file"].endswith("checkpoint_last.pt"), "resumed from the damaged file"
    # the state as loaded (the file itself may be overwritten since, e.g. checkpoint_best.pt by a better update)
    assert restart["num_updates"] == 4, f"{restart['file']} is not the newest intact one"
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(last) in warning and restart["file"] in warning, warning
    uninterrupted = train(data, tmp_path / "c", max_update=6)
    assert_same_tensors(resumed["model"], uninterrupted["model"], "model after damaged-last resume vs 6 updates")
    assert_same_adam_state(resumed["last_optimizer_state"], uninterrupted["last_optimizer_state"],
                           "optimizer after damaged-last resume vs 6 updates")
    assert stopped["optimizer_history"][-1]["num_updates"] == 4


def test_damaged_checkpoint_without_an_intact_one_is_a_one_line_error(data, tmp_path, one_thread):
    from fairseq import checkpoint_utils

    from mue.compat import DamagedCheckpointError
    from mue.errors import user_message

    train(data, tmp_path / "a", max_update=1)  # no interval checkpoint: last (and maybe best) only
    for path in (tmp_path / "a").glob("checkpoint*.pt"):
        truncate(path)
    last = tmp_path / "a" / "checkpoint_last.pt"
    with pytest.raises(DamagedCheckpointError) as err:
        train(data, tmp_path / "a", max_update=2)
    message = user_message(err.value)
    assert message is not None and "\n" not in message and str(last) in message and "--restore-file" in message
    with pytest.raises(DamagedCheckpointError, match=str(last)):  # --restore-file, --finetune-from-model, --path
        checkpoint_utils.load_checkpoint_to_cpu(str(last))


def test_checkpoint_copies_are_all_or_nothing(tmp_path, monkeypatch):
    """fairseq fills checkpoint_last.pt / checkpoint_best.pt with checkpoint_utils.PathManager.copy. A write
    that fails half-way (here the file-size limit, as a full disk would; a kill is the same for the
    destination) leaves the old destination whole and no temporary file; fairseq's own copy leaves it cut."""
    import resource
    import signal

    from fairseq import checkpoint_utils

    from mue import compat

    src, dst = tmp_path / "checkpoint_1_2.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    old = b"old checkpoint" * 1000
    limit = len(old) + 100_000  # room for the old file, not for the new one

    def copy_under_limit(copy):
        dst.write_bytes(old)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            with pytest.raises(OSError):
                copy(str(src), str(dst), overwrite=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
        return dst.read_bytes()

    assert copy_under_limit(checkpoint_utils.PathManager.copy) == old
    assert not list(tmp_path.glob("*.tmp"))
    fairseqs = compat.ORIGINALS["fairseq.checkpoint_utils.PathManager"].copy
    assert copy_under_limit(fairseqs) != old  # what the patch prevents: a cut checkpoint_last.pt
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()


def test_restarting_a_finished_run_trains_nothing(data, tmp_path, one_thread, caplog):
    """A job restarted after its last save (a scheduler's retry) must not train past --max-update."""
    finished = train(data, tmp_path / "a", max_update=2)
    with caplog.at_level(logging.INFO):
        again = train(data, tmp_path / "a", max_update=2)
    assert again["optimizer_history"][-1]["num_updates"] == 2, "the restart trained past --max-update"
    assert_same_tensors(again["model"], finished["model"], "model after restarting a finished run")
    assert "nothing left to train" in caplog.text


def test_optimizer_state_of_other_trainable_parameters_is_a_one_line_error(data, tmp_path, one_thread, monkeypatch):
    """A checkpoint saved while OFA's unused image-generation parameters were still trained holds Adam state
    for them; resuming it names the file and --reset-optimizer, which then works."""
    import mue.models.mue_ofa as mue_ofa
    from mue.compat import OptimizerStateMismatchError
    from mue.errors import user_message

    with monkeypatch.context() as m:
        m.setattr(mue_ofa, "UNUSED_PARAMETERS", ("(none)",))  # the model as it was: every parameter trained
        train(data, tmp_path / "a", max_update=1)
    last = tmp_path / "a" / "checkpoint_last.pt"
    with pytest.raises(OptimizerStateMismatchError) as err:
        train(data, tmp_path / "a", max_update=2)
    message = user_message(err.value)
    assert message is not None and "\n" not in message and str(last) in message and "--reset-optimizer" in message
    resumed = train(data, tmp_path / "a", 2, "--reset-optimizer")
    assert resumed["optimizer_history"][-1]["num_updates"] == 2
