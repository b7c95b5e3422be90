"""The training scripts (scripts/train/*.sh) and the fairseq-hydra-train configs (configs/*.yaml).

* --synthetic runs of snli_ve.sh, caption_stage1.sh and caption_stage2.sh (chained on stage 1's
  checkpoint) at the tiniest size, checking the checkpoint they write and what it was trained with;
* the full (GPU) runs with a stand-in fairseq-train / torchrun that only records its arguments: the
  paper's hyperparameters, the effective batch of 64, the update schedule, torchrun for NGPU > 1, and
  agreement with the yaml configs; the scripts' clear errors;
* fairseq-hydra-train with configs/snli_ve_synthetic.yaml for two updates.
"""
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mue  # noqa: F401  (registration and checkpoint-loading compat)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "train"
CONFIGS = REPO / "configs"
BIN = Path(sys.executable).parent


def script_env(**extra):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    for name in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SYNTHETIC", "BATCH_SIZE",
                 "EFFECTIVE_BATCH", "EPOCHS", "LR", "WARMUP_RATIO", "FINETUNE_FROM", "SCST_CE_WEIGHT"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name, *args, **env):
    return subprocess.run(["bash", str(SCRIPTS / name), *map(str, args)], env=script_env(**env),
                          capture_output=True, text=True, timeout=240)


def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def load(path):
    return torch.load(path, map_location="cpu")


# ---- --synthetic runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), num_train=2, num_valid=1, num_test=1, image_size=64)
    return root


@pytest.fixture(scope="module")
def stage1(synthetic_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("stage1")
    result = run_script("caption_stage1.sh", "--synthetic", synthetic_data, save, "--max-update", "2",
                        "--save-interval-updates", "1", EPOCHS=1, BATCH_SIZE=4)  # checkpoints after updates 1, 2
    check_ok(result)
    assert "--freeze-embeddings" not in result.stdout + result.stderr  # neither given nor warned about
    return save


def test_snli_ve_synthetic_makes_data_and_a_checkpoint(tmp_path):
    data, save = tmp_path / "data", tmp_path / "save"
    result = run_script("snli_ve.sh", "--synthetic", data, save, "--max-update", "2",
                        SYN_NUM_TRAIN=2, SYN_NUM_VALID=1, SYN_NUM_TEST=1, EPOCHS=1, BATCH_SIZE=2)
    check_ok(result)
    assert (data / "dict.txt").is_file() and (data / "snli_ve" / "train.tsv").is_file()
    assert len((data / "snli_ve" / "train.tsv").read_text().splitlines()) == 6  # 2 images x 3 hypotheses
    assert {p.name for p in save.glob("*.pt")} == {"checkpoint_best.pt", "checkpoint_last.pt"}
    state = load(save / "checkpoint_last.pt")
    cfg = state["cfg"]
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert cfg["model"]["_name"] == "mue_ofa_micro"  # the arch
    assert cfg["task"]["_name"] == "mue_snli_ve" and cfg["task"]["patch_image_size"] == 64
    assert cfg["criterion"]["_name"] == "mue" and cfg["common"]["cpu"]
    assert cfg["dataset"]["batch_size"] == 2 and cfg["optimization"]["update_freq"] == [1]


def test_caption_stage1_synthetic_writes_a_checkpoint(stage1):
    assert load(stage1 / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 2
    cfg = load(stage1 / "checkpoint_best.pt")["cfg"]
    assert cfg["task"]["_name"] == "mue_caption" and cfg["task"]["eval_cider"]
    assert cfg["criterion"]["_name"] == "mue" and cfg["criterion"]["label_smoothing"] == 0.1
    assert cfg["model"]["freeze_embeddings"] is False  # from scratch: the embeddings train
    assert cfg["checkpoint"]["best_checkpoint_metric"] == "cider"


EMBEDDING = "encoder.embed_tokens.weight"  # shared by encoder, decoder and the output projection


def test_caption_stage1_synthetic_trains_the_tied_embedding(stage1):
    """From scratch, the embedding (tied to the output layer) must move: a frozen one stays random."""
    first, second = load(stage1 / "checkpoint_1_1.pt"), load(stage1 / "checkpoint_last.pt")
    assert first["optimizer_history"][-1]["num_updates"] == 1 and second["optimizer_history"][-1]["num_updates"] == 2
    assert not torch.equal(first["model"][EMBEDDING], second["model"][EMBEDDING])
    assert torch.equal(second["model"][EMBEDDING], second["model"]["decoder.output_projection.weight"])


def test_the_real_recipes_freeze_keeps_the_embedding(stage1, synthetic_data, fake_run, tmp_path, caplog):
    """The real-data recipe's --freeze-embeddings, fine-tuning loaded weights (here stage 1's, at the micro
    size), leaves the embedding bit-identical, without the from-scratch warning."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    argv = fake_run("caption_stage1.sh")
    assert "--freeze-embeddings" in argv and option(argv, "--finetune-from-model") == str(fake_run.ckpt)
    start = stage1 / "checkpoint_last.pt"
    save = tmp_path / "frozen"
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), [
        str(synthetic_data / "caption"), "--task", "mue_caption", "--arch", "mue_ofa_micro", "--patch-image-size",
        "64", "--num-codes", "0", "--num-bins", "0", "--freeze-embeddings", "--finetune-from-model", str(start),
        "--criterion", "mue", "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1",
        "--batch-size", "4", "--cpu", "--num-workers", "0", "--disable-validation", "--save-dir", str(save),
        "--no-epoch-checkpoints", "--seed", "1"]))
    torch.set_num_threads(1)
    with caplog.at_level(logging.WARNING):
        train.main(cfg)
    after, before = load(save / "checkpoint_last.pt")["model"], load(start)["model"]
    assert torch.equal(after[EMBEDDING], before[EMBEDDING])
    assert not torch.equal(after["decoder.layers.0.fc1.weight"], before["decoder.layers.0.fc1.weight"])  # trained
    assert "--freeze-embeddings" not in caplog.text


def test_freezing_a_randomly_initialised_embedding_is_warned_about(synthetic_data, tmp_path, caplog):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from mue.models.pretrained_start import pretrained_start

    def build(*extra):
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), [
            str(synthetic_data / "caption"), "--task", "mue_caption", "--arch", "mue_ofa_micro", "--num-codes", "0",
            "--num-bins", "0", "--save-dir", str(tmp_path / "save"), *extra]))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = tasks.setup_task(cfg.task).build_model(cfg.model)
        return cfg, model, [r.getMessage() for r in caplog.records if "--freeze-embeddings" in r.getMessage()]

    cfg, model, warned = build("--freeze-embeddings")
    assert pretrained_start(cfg.model) == "" and not model.encoder.embed_tokens.weight.requires_grad
    assert len(warned) == 1 and "random initialisation" in warned[0] and "--finetune-from-model" in warned[0]
    ckpt = tmp_path / "pretrained.pt"
    ckpt.write_bytes(b"x")
    for extra in (["--finetune-from-model", str(ckpt)], ["--restore-file", str(ckpt)], []):
        freeze = ["--freeze-embeddings"] if extra else []
        assert build(*freeze, *extra)[2] == [], extra
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "checkpoint_last.pt").write_bytes(b"x")  # a resumed run: its start decided
    assert build("--freeze-embeddings")[2] == []


def test_caption_stage2_synthetic_from_stage1(stage1, synthetic_data, tmp_path):
    from fairseq.criterions import CRITERION_REGISTRY

    if "mue_scst" not in CRITERION_REGISTRY:
        pytest.skip("criterion mue_scst (mue/criterions/scst.py) is not registered yet")
    save = tmp_path / "stage2"
    result = run_script("caption_stage2.sh", "--synthetic", synthetic_data, save, "--max-update", "1",
                        EPOCHS=1, BATCH_SIZE=2, FINETUNE_FROM=stage1 / "checkpoint_best.pt")
    check_ok(result)
    assert f"loading pretrained model from {stage1 / 'checkpoint_best.pt'}" in result.stdout + result.stderr
    state = load(save / "checkpoint_last.pt")
    cfg = state["cfg"]
    assert state["optimizer_history"][-1]["num_updates"] == 1
    assert cfg["criterion"]["_name"] == "mue_scst" and cfg["criterion"]["scst_samples"] == 5
    assert cfg["criterion"]["scst_cider_df"] == str(save / "cider_d_df.json")
    assert (save / "cider_d_df.json").is_file()  # document frequencies of the training references
    assert cfg["criterion"]["scst_refs"] == str(save / "train_refs.sqlite")
    assert (save / "train_refs.sqlite").is_file()  # the training references' store, built at the first step
    assert cfg["model"]["dropout"] == 0.0


# ---- full runs, with a stand-in fairseq-train ----------------------------------------------------


@pytest.fixture
def fake_run(tmp_path):
    """DATA_DIR with a 1000-row train.tsv, a checkpoint file, and stand-ins that record their argv."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("row\n" * 1000)
    ckpt = tmp_path / "ofa.pt"
    ckpt.write_bytes(b"x")
    record = tmp_path / "argv"
    for tool in ("fake-train", "fake-torchrun"):
        (tmp_path / tool).write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool}" "$@" > "{record}"\n')
        (tmp_path / tool).chmod(0o755)
    env = {"FAIRSEQ_TRAIN": tmp_path / "fake-train", "TORCHRUN": tmp_path / "fake-torchrun"}

    def run(script, **extra):
        result = run_script(script, data, ckpt, tmp_path / "save", "--seed", "3", **env, **extra)
        check_ok(result)
        return record.read_text().splitlines()

    def synthetic(script, **extra):
        """The --synthetic run's argv (data already in place, so nothing is generated)."""
        result = run_script(script, "--synthetic", data, tmp_path / "save", **env, **extra)
        check_ok(result)
        return record.read_text().splitlines()

    (data / "dict.txt").write_text("")
    (data / "caption").mkdir()
    (data / "caption" / "train.tsv").write_text("row\n" * 64)
    run.ckpt = ckpt
    run.synthetic = synthetic
    return run


def option(argv, name):
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


YAML_OF = {"snli_ve.sh": "snli_ve.yaml", "caption_stage1.sh": "caption_stage1.yaml",
           "caption_stage2.sh": "caption_stage2.yaml"}


@pytest.mark.parametrize("script,lr,epochs,batch,criterion", [
    ("snli_ve.sh", 5e-5, 5, 8, "mue"), ("caption_stage1.sh", 1e-5, 5, 8, "mue"),
    ("caption_stage2.sh", 1e-5, 3, 2, "mue_scst")])
def test_full_run_arguments_and_yaml_agree(fake_run, script, lr, epochs, batch, criterion):
    argv = fake_run(script)
    assert argv[0] == "fake-train"
    assert float(option(argv, "--lr")) == lr and int(option(argv, "--max-epoch")) == epochs
    assert int(option(argv, "--batch-size")) * int(option(argv, "--update-freq")) == 64  # one GPU
    updates = epochs * math.ceil(1000 / 64)
    assert int(option(argv, "--total-num-update")) == updates
    assert int(option(argv, "--warmup-updates")) == int(0.06 * updates)
    assert option(argv, "--finetune-from-model") == str(fake_run.ckpt)
    assert option(argv, "--arch") == "mue_ofa_base" and option(argv, "--patch-image-size") == "480"
    assert option(argv, "--criterion") == criterion and option(argv, "--seed") == "3"  # extra args pass through
    assert option(argv, "--user-dir") == str(REPO / "mue") and "--cpu" not in argv
    # the yaml config is the same run
    y = OmegaConf.load(CONFIGS / YAML_OF[script])
    assert y.optimization.lr == [lr] and y.optimization.max_epoch == epochs
    assert y.dataset.batch_size * y.optimization.update_freq[0] * y.distributed_training.distributed_world_size == 64
    assert y.criterion._name == criterion and y.task._name == option(argv, "--task")
    for key, flag in [("dropout", "--dropout"), ("encoder_drop_path_rate", "--encoder-drop-path-rate"),
                      ("decoder_drop_path_rate", "--decoder-drop-path-rate")]:
        assert y.model[key] == float(option(argv, flag)), key
    assert y.model.get("freeze_embeddings", False) == ("--freeze-embeddings" in argv)
    assert y.optimizer.weight_decay == float(option(argv, "--weight-decay"))
    assert y.optimization.clip_norm == float(option(argv, "--clip-norm"))
    assert y.task.patch_image_size == 480 and y.model.encoder_embed_dim == 768
    if criterion == "mue":
        assert y.criterion.label_smoothing == float(option(argv, "--label-smoothing"))
        drop = script == "caption_stage1.sh"  # OFA's drop-worst is a caption stage-1 trick
        assert y.criterion.get("drop_worst_ratio", 0.0) == (0.2 if drop else 0.0)
        assert ("--drop-worst-ratio" in argv) == drop
        if drop:
            assert float(option(argv, "--drop-worst-ratio")) == 0.2 and int(option(argv, "--drop-worst-after")) == 6000
            assert y.criterion.drop_worst_after == 6000
    else:
        assert y.criterion.scst_samples == int(option(argv, "--scst-samples")) == 5
        assert y.criterion.scst_beam is True and "--scst-beam" in argv  # OFA's stage 2: beam search's 5 best
        save = Path(option(argv, "--save-dir"))  # both cache files live in the save dir, in shell and yaml
        for key, flag, name in [("scst_cider_df", "--scst-cider-df", "cider_d_df.json"),
                                ("scst_refs", "--scst-refs", "train_refs.sqlite")]:
            assert option(argv, flag) == str(save / name), flag
            assert y.criterion[key] == f"{y.checkpoint.save_dir}/{name}", key


def test_freeze_embeddings_only_where_a_recipe_starts_from_pretrained_weights(fake_run):
    """The caption recipes (mue/recipes.py) freeze the embeddings exactly when the run fine-tunes OFA's
    weights; the shell scripts and the yaml configs follow (test_recipes.py checks the configs in full)."""
    for script in ("caption_stage1.sh", "caption_stage2.sh"):
        real = fake_run(script)
        assert "--freeze-embeddings" in real and "--finetune-from-model" in real, script
        synthetic = fake_run.synthetic(script)
        assert "--freeze-embeddings" not in synthetic and "--arch" in synthetic, script
    stage1 = fake_run.ckpt.parent / "stage1.pt"
    stage1.write_bytes(b"x")
    chained = fake_run.synthetic("caption_stage2.sh", FINETUNE_FROM=stage1)  # still a from-scratch chain
    assert option(chained, "--finetune-from-model") == str(stage1) and "--freeze-embeddings" not in chained
    for name in ("caption_stage1", "caption_stage2", "caption_stage1_synthetic", "caption_stage2_synthetic"):
        y = OmegaConf.load(CONFIGS / f"{name}.yaml")
        from_ofa = OmegaConf.is_missing(y.checkpoint, "finetune_from_model")  # the user must give OFA's weights
        assert y.model.freeze_embeddings == from_ofa == (not name.endswith("synthetic")), name


def test_synthetic_runs_take_the_demo_recipe(fake_run):
    """--synthetic is the recipe `make demo` trains (mue/recipes.py), environment overrides winning."""
    from mue import recipes

    for script, name in (("snli_ve.sh", "snli_ve"), ("caption_stage1.sh", "caption_stage1"),
                         ("caption_stage2.sh", "caption_stage2")):
        r = recipes.recipe(name, synthetic=True)
        argv = fake_run.synthetic(script)
        assert float(option(argv, "--lr")) == r.lr and int(option(argv, "--max-epoch")) == r.epochs, script
        assert int(option(argv, "--batch-size")) == r.batch_size and option(argv, "--update-freq") == "1", script
        assert (int(option(argv, "--warmup-updates")), int(option(argv, "--total-num-update"))) == (50, 100000)
        assert option(argv, "--arch") == "mue_ofa_micro" and "--cpu" in argv, script
        assert argv[argv.index("--arch"):argv.index("--arch") + len(r.options)] == list(r.options), script
    argv = fake_run.synthetic("caption_stage2.sh", LR="3e-5", BATCH_SIZE="4", SCST_CE_WEIGHT="0.25")
    assert (option(argv, "--lr"), option(argv, "--batch-size"), option(argv, "--scst-ce-weight")) == ("3e-5", "4", "0.25")


def test_full_run_on_two_gpus_uses_torchrun(fake_run):
    argv = fake_run("snli_ve.sh", NGPU=2)
    assert argv[0] == "fake-torchrun" and option(argv, "--nproc-per-node") == "2"
    assert argv[argv.index("--nproc-per-node") + 2].endswith("fake-train")
    assert option(argv, "--distributed-world-size") == "2"
    assert int(option(argv, "--batch-size")) * int(option(argv, "--update-freq")) * 2 == 64
    assert int(option(argv, "--total-num-update")) == 5 * math.ceil(math.ceil(1000 / 16) / 4)


def test_script_errors_are_clear(tmp_path):
    result = run_script("snli_ve.sh")
    assert result.returncode == 2 and "usage: snli_ve.sh DATA_DIR CHECKPOINT SAVE_DIR" in result.stderr
    result = run_script("caption_stage1.sh", tmp_path, tmp_path / "missing.pt", tmp_path / "save")
    assert result.returncode == 2 and f"checkpoint not found: {tmp_path / 'missing.pt'}" in result.stderr
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "train.tsv").write_text("row\n")
    result = run_script("snli_ve.sh", tmp_path, ckpt, tmp_path / "save", EFFECTIVE_BATCH=60)
    assert result.returncode == 2 and "EFFECTIVE_BATCH=60 is not a multiple of BATCH_SIZE*NGPU=8*1" in result.stderr
    result = run_script("snli_ve.sh", tmp_path, ckpt, tmp_path / "save", NGPU="two")
    assert result.returncode == 2 and "NGPU must be a positive integer, got 'two'" in result.stderr


# ---- fairseq-hydra-train ------------------------------------------------------------------------


def test_hydra_config_synthetic_trains(synthetic_data, tmp_path):
    save = tmp_path / "save"
    cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", str(CONFIGS), "--config-name", "snli_ve_synthetic",
           f"task.data={synthetic_data / 'snli_ve'}", f"common.user_dir={REPO / 'mue'}",
           f"checkpoint.save_dir={save}", "optimization.max_update=2", "dataset.batch_size=2"]
    result = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=240)
    check_ok(result)
    state = load(save / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 2
    model = state["cfg"]["model"]
    assert model["_name"] == "mue_ofa" and model["encoder_embed_dim"] == 128 and model["resnet_blocks"] == "1,1,1"
    assert state["model"]["encoder.embed_tokens.weight"].shape[1] == 128  # the micro sizes were used
    assert state["cfg"]["lr_scheduler"]["_name"] == "polynomial_decay"
    assert (save / "hydra_train.log").is_file() and not (tmp_path / "outputs").exists()


def test_all_yaml_configs_load_with_their_mandatory_fields():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["caption_stage1", "caption_stage1_synthetic", "caption_stage2", "caption_stage2_synthetic",
                     "snli_ve", "snli_ve_synthetic"]
    for name in names:
        y = OmegaConf.load(CONFIGS / f"{name}.yaml")
        missing = {k for k in ("common.user_dir", "task.data", "checkpoint.finetune_from_model")
                   if OmegaConf.is_missing(OmegaConf.select(y, k.rsplit(".", 1)[0]), k.rsplit(".", 1)[1])}
        expected = {"common.user_dir", "task.data"} | ({"checkpoint.finetune_from_model"}
                                                        if not name.endswith("synthetic") else set())
        assert missing == expected, name
        assert y.model._name == "mue_ofa" and y.optimization.lr[0] > 0, name
