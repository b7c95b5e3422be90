"""The package installed the ordinary way (not editable), used from a directory outside the clone.

* `pip install --no-deps --no-build-isolation --no-index --target SITE` of a copy of the sources (no
  network, no build/ left in the clone): the wheel's files land there (package, configs as package data,
  the console scripts mue-train / mue-generate / mue-validate / mue-hydra-train);
* from another directory with PYTHONPATH=SITE: mue-train and mue-hydra-train (a shipped config, no
  --config-dir / common.user_dir given) each write a checkpoint, and mue-generate scores one with no
  option but data, --path and --gen-subset; each loads the installed plugin, not the clone, and prints
  no third-party warning;
* `import mue` followed by fairseq with --user-dir to another copy of mue (mue.compat.one_plugin_copy),
  and the import-time filters of mue.compat.quiet_third_party_imports, which leave the user's own
  warnings alone.
"""
import logging
import os
import shutil
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest

from mue import compat

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("mue-train", "mue-generate", "mue-validate", "mue-hydra-train")
TINY = ["--arch", "mue_ofa_micro", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--resnet-blocks", "1,1,1"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A non-editable install of a copy of the sources (setup.py, mue/, configs/) into a fresh folder."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    for folder in ("mue", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
                             str(src)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def test_install_holds_the_package_its_configs_and_the_commands(site):
    assert (site / "mue" / "__init__.py").is_file() and (site / "mue" / "cli.py").is_file()
    assert (site / "mue" / "tasks" / "vl_task.py").is_file()
    shipped = sorted(p.name for p in (site / "mue" / "configs").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (REPO / "configs").glob("*.yaml")) and shipped
    for name in SCRIPTS:
        assert os.access(site / "bin" / name, os.X_OK), name
    entry_points = next(site.glob("mue-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "mue-generate = mue.cli:generate" in entry_points


@pytest.fixture(scope="module")
def outside(site, tmp_path_factory):
    """Runs of the installed commands from a folder outside the clone: {name: CompletedProcess}."""
    from mue.data.synthetic import generate

    work = tmp_path_factory.mktemp("elsewhere")
    generate(str(work / "syn"), num_train=2, num_valid=1, num_test=2, image_size=64)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    for name in ("MUE_DEBUG", "LOGLEVEL"):
        env.pop(name, None)
    bin_dir = site / "bin"

    def start(name, argv):
        out, err = open(work / f"{name}.out", "w"), open(work / f"{name}.err", "w")
        return subprocess.Popen([str(bin_dir / argv[0]), *argv[1:]], cwd=work, env=env, stdout=out, stderr=err)

    def finish(name, proc):
        proc.wait(timeout=180)
        return subprocess.CompletedProcess(proc.args, proc.returncode, (work / f"{name}.out").read_text(),
                                           (work / f"{name}.err").read_text())

    first = {
        "train": start("train", ["mue-train", "syn/snli_ve", "--task", "mue_snli_ve", *TINY,
                                 "--patch-image-size", "64", "--num-codes", "0", "--num-bins", "0",
                                 "--criterion", "mue", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1",
                                 "--batch-size", "4", "--save-dir", "train", "--num-workers", "0", "--cpu",
                                 "--no-epoch-checkpoints", "--disable-validation"]),
        "hydra": start("hydra", ["mue-hydra-train", "--config-name", "snli_ve_synthetic",
                                 f"task.data={work / 'syn' / 'snli_ve'}", f"checkpoint.save_dir={work / 'hydra'}",
                                 "optimization.max_update=1", "dataset.disable_validation=true",
                                 "model.encoder_layers=2", "model.decoder_layers=2"]),
    }
    runs = {name: finish(name, proc) for name, proc in first.items()}
    if runs["train"].returncode == 0:
        runs["generate"] = finish("generate", start("generate", [
            "mue-generate", "syn/snli_ve", "--path", "train/checkpoint_last.pt", "--gen-subset", "test"]))
    return work, runs


def ok(result):
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def test_mue_train_and_generate_from_elsewhere_use_the_installed_plugin(site, outside):
    work, runs = outside
    log = ok(runs["train"])
    assert (work / "train" / "checkpoint_last.pt").is_file()
    assert f"'user_dir': '{site / 'mue'}'" in log  # the installed package, not the clone
    log = ok(runs["generate"])
    assert f"'user_dir': '{site / 'mue'}'" in log
    assert "'patch_image_size': 64" in log and "SNLI-VE test: accuracy" in log


def test_mue_hydra_train_finds_the_shipped_config(site, outside):
    work, runs = outside
    ok(runs["hydra"])
    assert (work / "hydra" / "checkpoint_last.pt").is_file()
    log = (work / "hydra" / "hydra_train.log").read_text()
    assert f"'user_dir': '{site / 'mue'}'" in log


@pytest.mark.parametrize("name", ["train", "hydra", "generate"])
def test_the_commands_print_no_third_party_warnings(outside, name):
    result = outside[1][name]
    ok(result)
    for noise in ("Warning:", "tensorboardX", "torch.jit.script", "version_base", "ConfigStore"):
        assert noise not in result.stderr + result.stdout, (name, noise)


# ---- in this process ----------------------------------------------------------------------------


def test_user_dir_to_another_copy_of_an_imported_mue_keeps_the_imported_one(site, caplog):
    import mue
    from fairseq import utils

    other = site / "mue"
    with caplog.at_level(logging.WARNING):
        utils.import_user_module(Namespace(user_dir=str(other)))
    assert f"--user-dir {other}: the plugin 'mue' is already imported from {mue.__path__[0]}" in caplog.text
    utils.import_user_module(Namespace(user_dir=mue.__path__[0]))  # the imported one itself: nothing to do
    with pytest.raises(ImportError, match="not globally unique"):  # fairseq's own, the patch left out
        compat.ORIGINALS["fairseq.utils.import_user_module"](Namespace(user_dir=str(other)))


def test_import_filters_touch_fairseq_only():
    def shown(message, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit(message, FutureWarning, f"{module.replace('.', '/')}.py", 1, module=module,
                                   registry={})
        return bool(caught)

    compat.quiet_third_party_imports()  # pytest resets the warning filters for each test: install them again
    assert not shown("`torch.cuda.amp.autocast(args...)` is deprecated", "fairseq.tasks.fairseq_task")
    assert shown("`torch.cuda.amp.autocast(args...)` is deprecated", "my_training_script")
    # the torch.jit.script filter lasted only while mue imported fairseq
    assert shown("`torch.jit.script` is deprecated. Please switch to `torch.compile`", "my_model")
    record = logging.LogRecord("fairseq.tasks.text_to_speech", logging.INFO, "x.py", 1,
                               "Please install tensorboardX: pip install tensorboardX", None, None)
    assert not logging.getLogger("fairseq.tasks.text_to_speech").filter(record)
    record.msg = "something else"
    assert logging.getLogger("fairseq.tasks.text_to_speech").filter(record)
