"""Checkpoints carry their task: fairseq-generate rebuilds a checkpoint from the options it was trained with.

A micro SNLI-VE checkpoint is trained in-process on synthetic 64 px data without image codes or location
bins, with OFA's premise prompt and --max-src-length 40 (none of them defaults). Then:
* the real `fairseq-generate` CLI (subprocesses, run side by side) with only the data, --path,
  --gen-subset and --user-dir: it runs at 64 px and scores; a contradicting --patch-image-size and
  --num-bins are one `error:` line naming each with both values;
* in-process: the same with --task runs, while fairseq's own generate.main (mue.compat.ORIGINALS, the
  patch left out) fails on it with the shape mismatch, so the patch is what makes it work; another
  --task than the checkpoint's is an error naming both;
* what counts as given: a value typed on the command line, even the default's, is compared, not replaced;
  the checkpoints of an ensemble must agree; a checkpoint saves the values, not "not given".
"""
from pathlib import Path

import pytest
import torch
from fairseq import options
from omegaconf import OmegaConf

from mue import compat
from mue.errors import OptionError
from mue.models.state_dict import CheckpointMismatchError
from mue.tasks.vl_task import REBUILD_DEFAULTS, adopt_checkpoint_options
from test_errors import one_error_line, run_generate_together

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "mue_ofa_micro", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--resnet-blocks", "1,1,1"]
#: what the checkpoint is trained with; every one differs from the option's default
TRAINED = {"patch_image_size": 64, "num_codes": 0, "num_bins": 0, "max_src_length": 40, "add_premise": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, checkpoint) of one update of a micro SNLI-VE model at 64 px, no codes/bins, premise prompt."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("ckpt_task")
    generate(str(root / "syn"), num_train=2, num_valid=1, num_test=2, image_size=64)
    data, save = root / "syn" / "snli_ve", root / "save"
    argv = [str(data), "--task", "mue_snli_ve", *TINY, "--patch-image-size", "64", "--num-codes", "0",
            "--num-bins", "0", "--add-premise", "--max-src-length", "40", "--criterion", "mue",
            "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--batch-size", "4",
            "--save-dir", str(save), "--cpu", "--num-workers", "0", "--no-epoch-checkpoints",
            "--disable-validation", "--no-progress-bar"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv)))
    finally:
        torch.set_num_threads(threads)
    return data, save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def runs(trained):
    """{name: CompletedProcess} of fairseq-generate runs, started together to share the start-up time."""
    data, checkpoint = trained
    root = checkpoint.parent
    cases = {
        "bare": [],  # no --task either: the checkpoint's
        "contradicting": ["--task", "mue_snli_ve", "--patch-image-size", "32", "--num-bins", "5"],
    }
    return run_generate_together(root, {name: [str(data), "--path", str(checkpoint), "--gen-subset", "test",
                                               "--user-dir", str(REPO / "mue"), *extra]
                                        for name, extra in cases.items()}, timeout=180)


def test_checkpoint_saves_the_values_it_was_trained_with(trained):
    task = torch.load(trained[1], map_location="cpu")["cfg"]["task"]
    assert {name: task[name] for name in TRAINED} == TRAINED
    # options not given at training are saved as their defaults, not as None ("not given")
    assert task["max_tgt_length"] == REBUILD_DEFAULTS["max_tgt_length"] and task["imitation_hidden"] == 0


def test_generate_with_only_data_path_and_split_runs_at_the_checkpoints_size_and_scores(runs):
    result = runs["bare"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "'patch_image_size': 64, " in log and "'num_codes': 0, " in log and "'add_premise': True" in log
    assert "--task mue_snli_ve: from" in log  # fairseq's default task (translation) was not given
    assert "--patch-image-size 64" in log and "--max-src-length 40" in log  # what was taken, logged
    assert "split 'test': all 6 examples evaluated" in log
    assert "SNLI-VE test: accuracy" in log


def test_contradicting_image_size_and_num_bins_are_one_line_naming_each(runs, trained):
    line = one_error_line(runs["contradicting"])
    assert line == (f"error: --num-bins 5 contradicts {trained[1]}, which was trained with --num-bins 0 (leave "
                    f"the option out to use the checkpoint's); --patch-image-size 32 contradicts {trained[1]}, "
                    "which was trained with --patch-image-size 64 (leave the option out to use the checkpoint's)")


def generation_args(data, checkpoint, *extra):
    return options.parse_args_and_arch(options.get_generation_parser(), [
        str(data), "--task", "mue_snli_ve", "--path", str(checkpoint), "--gen-subset", "test", "--cpu",
        "--num-workers", "0", *extra])


def test_with_task_the_patched_entry_runs_and_without_the_patch_the_checkpoint_does_not_fit(trained, one_thread,
                                                                                           caplog):
    from fairseq_cli import generate

    assert generate.main is compat._generate_main_with_checkpoint_task
    with caplog.at_level("INFO"):
        generate.main(generation_args(*trained))  # the README's form: --task given, no task option
    assert "SNLI-VE test: accuracy" in caplog.text and "all 6 examples evaluated" in caplog.text
    with pytest.raises(CheckpointMismatchError):
        compat.ORIGINALS["fairseq_cli.generate.main"](generation_args(*trained))


def test_another_task_is_an_error_naming_both(trained):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    data, checkpoint = trained
    args = options.parse_args_and_arch(options.get_generation_parser(), [
        str(data), "--task", "mue_caption", "--path", str(checkpoint), "--gen-subset", "test"])
    with pytest.raises(OptionError, match=f"^--task mue_caption: {checkpoint} was trained with --task mue_snli_ve$"):
        compat.take_task_from_checkpoints(convert_namespace_to_omegaconf(args))


# ---- what counts as given --------------------------------------------------------------------------


def task_cfg(data, *extra):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(generation_args(data, "ckpt.pt", *extra)).task


def test_a_typed_default_is_given_and_compared(trained):
    data = trained[0]
    cfg = task_cfg(data, "--patch-image-size", "480")  # the default's value, typed
    with pytest.raises(OptionError, match=r"--patch-image-size 480 contradicts c.pt, which was trained with "
                                          r"--patch-image-size 64"):
        adopt_checkpoint_options(cfg, dict(TRAINED, _name="mue_snli_ve"), "c.pt")
    cfg = task_cfg(data, "--patch-image-size", "64", "--add-premise")  # agreeing values are fine
    taken = adopt_checkpoint_options(cfg, dict(TRAINED, _name="mue_snli_ve"), "c.pt")
    assert "patch_image_size" not in taken and "add_premise" not in taken and cfg.num_codes == 0


def test_a_premise_flag_the_checkpoint_lacks_is_refused(trained):
    cfg = task_cfg(trained[0], "--add-premise")
    with pytest.raises(OptionError, match="--add-premise contradicts c.pt, which was trained with no --add-premise"):
        adopt_checkpoint_options(cfg, {"_name": "mue_snli_ve"}, "c.pt")  # older checkpoint: defaults


def test_the_decoder_prompt_comes_from_the_checkpoint(trained):
    cfg = task_cfg(trained[0])
    assert "decoder_prompt" in adopt_checkpoint_options(cfg, {"decoder_prompt": True}, "p.pt")
    assert cfg.decoder_prompt is True
    cfg = task_cfg(trained[0], "--decoder-prompt")
    with pytest.raises(OptionError, match="--decoder-prompt contradicts q.pt, which was trained with no --decoder-prompt"):
        adopt_checkpoint_options(cfg, {"_name": "mue_snli_ve"}, "q.pt")


def test_a_saved_none_is_the_default_and_an_ensemble_must_agree(trained):
    cfg = task_cfg(trained[0])
    origin = {}
    taken = adopt_checkpoint_options(cfg, {"patch_image_size": None, "num_codes": 0}, "a.pt", origin)
    assert cfg.patch_image_size == 480 and cfg.num_codes == 0 and cfg.num_bins == 1000
    assert set(taken) == {*REBUILD_DEFAULTS, "add_premise", "decoder_prompt"} and origin["num_codes"] == "a.pt"
    with pytest.raises(OptionError, match="a.pt was trained with --num-codes 0, b.pt with --num-codes 8192: "
                                          "the checkpoints of an ensemble must agree"):
        adopt_checkpoint_options(cfg, {"num_codes": 8192}, "b.pt", origin)


def test_model_overrides_name_task_options_over_the_checkpoint(trained):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    data, checkpoint = trained
    cfg = convert_namespace_to_omegaconf(generation_args(data, checkpoint, "--model-overrides",
                                                         "{'max_src_length': 30}"))
    compat.take_task_from_checkpoints(cfg)
    assert cfg.task.max_src_length == 30 and cfg.task.patch_image_size == 64 and cfg.task.add_premise is True
    assert OmegaConf.is_dict(cfg.task)
