"""Errors the user can fix reach them as one line, with exit status 1 and no traceback.

* the real `fairseq-generate` CLI (subprocesses, run side by side) on OFA SNLI-VE TSVs with a row of
  the wrong column count, an undecodable base64 image, a 15000 x 15000 decompression bomb, and with
  `--img-thres -5`; with MUE_DEBUG=1 the traceback is back. Images are decoded in a DataLoader worker
  (fairseq-generate's default --num-workers 1), so those two runs also cover the worker re-raise;
* `mue.errors.user_message` on errors as torch re-raises them from a DataLoader worker and from
  torch.multiprocessing.spawn (fairseq's multi-GPU workers), and as fairseq's Trainer wraps a checkpoint
  that does not fit; the hook of mue.compat in-process.
"""
import base64
import io
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from PIL import Image
from torch._utils import ExceptionWrapper
from torch.multiprocessing import ProcessRaisedException

from mue import compat
from mue.data.readers import DataError
from mue.errors import OptionError, UserError, user_message
from mue.models.state_dict import CheckpointMismatchError
from test_resume import data, train  # noqa: F401  (data: a fixture; train: a tiny model, a few updates)
from test_tasks import SMALL

REPO = Path(__file__).resolve().parents[1]
GENERATE = Path(sys.executable).parent / "fairseq-generate"


# ---- the real CLI ---------------------------------------------------------------------------------


def bad_copy(data_dir, folder, line2=None, replace_image=None):
    """A copy of the synthetic SNLI-VE test split (3 rows) whose line 2 is `line2`, or has `replace_image`
    (base64 text) in its image column."""
    folder.mkdir()
    shutil.copy(data_dir.parent / "dict.txt", folder / "dict.txt")
    rows = (data_dir / "test.tsv").read_text().splitlines()
    if replace_image is not None:
        fields = rows[1].split("\t")
        fields[2] = replace_image
        line2 = "\t".join(fields)
    rows[1] = line2
    (folder / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):  # noqa: F811  (data is test_resume's fixture)
    """({name: CompletedProcess}, {name: data dir}) of fairseq-generate runs, started together to share
    the start-up time; their output goes to files (a full pipe would stall a run)."""
    root = tmp_path_factory.mktemp("errors")
    train(data, root / "save", max_update=1)
    checkpoint = root / "save" / "checkpoint_last.pt"
    rows = (data / "test.tsv").read_text().splitlines()
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")  # 27 KB, 225 M pixels
    dirs = {
        "columns": bad_copy(data, root / "columns", line2="\t".join(rows[1].split("\t")[:5])),
        "base64": bad_copy(data, root / "base64", replace_image=base64.b64encode(b"not an image").decode()),
        "bomb": bad_copy(data, root / "bomb", replace_image=base64.b64encode(bomb.getvalue()).decode()),
    }
    dirs["columns_debug"] = dirs["columns"]
    cases = {name: [str(path)] for name, path in dirs.items()}
    cases["option"] = [str(data), "--img-thres=-5"]  # "=": argparse would read "-5" as an option
    commands = {name: [*argv, "--user-dir", str(REPO / "mue"), "--task", "mue_snli_ve", "--path", str(checkpoint),
                       "--cpu", "--gen-subset", "test", "--batch-size", "2", *SMALL] for name, argv in cases.items()}
    return run_generate_together(root, commands, timeout=120, debug=lambda name: name.endswith("_debug")), dirs


def run_generate_together(root, commands, timeout, debug=lambda name: False):
    """{name: CompletedProcess} of `fairseq-generate ARGS` for each {name: ARGS}, started together to share
    the start-up time (one thread each, MUE_DEBUG only where `debug(name)`); their output goes to files
    in `root` (a full pipe would stall a run)."""
    procs = {}
    for name, args in commands.items():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("MUE_DEBUG", None)
        if debug(name):
            env["MUE_DEBUG"] = "1"
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([str(GENERATE), *args], cwd=root, env=env, stdout=out, stderr=err)
    results = {}
    for name, proc in procs.items():
        proc.wait(timeout=timeout)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, (root / f"{name}.out").read_text(),
                                                    (root / f"{name}.err").read_text())
    return results


def one_error_line(result) -> str:
    """The single `error: ...` line of a run that failed with status 1 and printed no traceback."""
    tail = result.stderr[-3000:]
    assert result.returncode == 1, tail
    assert "Traceback" not in result.stderr, tail
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, tail
    return lines[0]


def test_wrong_column_count_is_one_line_naming_file_and_line(runs):
    results, dirs = runs
    line = one_error_line(results["columns"])
    assert line == f"error: {dirs['columns'] / 'test.tsv'}:2: expected 7 columns, got 5"


def test_mue_debug_brings_the_traceback_back(runs):
    result = runs[0]["columns_debug"]
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "mue.data.readers.DataError: " in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_undecodable_image_in_a_dataloader_worker_is_one_line(runs):
    results, dirs = runs
    line = one_error_line(results["base64"])
    assert line.startswith(f"error: {dirs['base64'] / 'test.tsv'}:2: cannot decode the base64 image: ")
    assert "Caught DataError" not in results["base64"].stderr


def test_decompression_bomb_is_one_line_naming_file_line_and_size(runs):
    results, dirs = runs
    line = one_error_line(results["bomb"])
    assert line.startswith(f"error: {dirs['bomb'] / 'test.tsv'}:2: the base64 image is 15000 x 15000 pixels")
    assert "resize" in line
    assert "DecompressionBomb" not in results["bomb"].stderr


def test_bad_option_value_is_one_line_naming_the_option(runs):
    line = one_error_line(runs[0]["option"])
    assert "--img-thres" in line


# ---- message extraction ---------------------------------------------------------------------------


def test_our_errors_are_user_errors_and_still_value_errors():
    for cls in (DataError, OptionError, CheckpointMismatchError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


def dataloader_reraised(exc):
    """`exc` as the main process gets it from a DataLoader worker (torch's ExceptionWrapper.reraise)."""
    try:
        raise exc
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as reraised:
        return reraised


def spawn_raised(exc, during=None):
    """What torch.multiprocessing.spawn raises in the parent when a child dies of `exc` (or of `during`,
    raised while handling `exc`): the child's traceback.format_exc() after a header (spawn.py)."""
    try:
        try:
            raise exc
        except Exception:
            if during is not None:
                raise during
            raise
    except Exception:
        trace = traceback.format_exc()
    return ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 4242)


def test_user_message_of_plain_errors():
    assert user_message(DataError("a.tsv:3: expected 7 columns, got 5")) == "a.tsv:3: expected 7 columns, got 5"
    assert user_message(OptionError("--img-thres must be in [0, 1], got -5.0")).startswith("--img-thres")
    assert user_message(ValueError("a bug")) is None and user_message(KeyError("x")) is None


def test_user_message_unwraps_a_dataloader_worker_error():
    reraised = dataloader_reraised(DataError("a.tsv:3: cannot decode the base64 image: bad"))
    assert isinstance(reraised, DataError)
    assert str(reraised).startswith("Caught DataError in DataLoader worker process 0.\nOriginal Traceback")
    assert user_message(reraised) == "a.tsv:3: cannot decode the base64 image: bad"
    assert user_message(dataloader_reraised(ValueError("a bug"))) is None


def test_user_message_unwraps_a_spawned_worker_error():
    assert user_message(spawn_raised(DataError("a.tsv:3: bad row"))) == "a.tsv:3: bad row"
    assert user_message(spawn_raised(OptionError("--img-thres: -5 < 0"))) == "--img-thres: -5 < 0"
    lines = "the checkpoint does not fit the model (nothing was loaded):\n  missing from the checkpoint (1): w"
    assert user_message(spawn_raised(CheckpointMismatchError(lines))) == lines
    assert user_message(spawn_raised(RuntimeError("a bug"))) is None
    # a bug while handling our error: the bug ended the worker, so it keeps its traceback
    assert user_message(spawn_raised(DataError("a.tsv:3: bad row"), during=RuntimeError("a bug"))) is None


def test_user_message_of_a_checkpoint_error_wrapped_by_fairseqs_trainer():
    lines = "the checkpoint does not fit the model (nothing was loaded):\n  missing from the checkpoint (1): w"
    wrapper = "Cannot load model parameters from checkpoint c.pt; please ensure that the architectures match."
    try:
        try:
            raise CheckpointMismatchError(lines)
        except Exception:
            raise Exception(wrapper)  # as fairseq.trainer.Trainer.load_checkpoint does
    except Exception as wrapped:
        assert user_message(wrapped) == f"{wrapper}\n{lines}"
    try:
        try:
            raise ValueError("a bug")
        except Exception:
            raise Exception(wrapper)
    except Exception as wrapped:
        assert user_message(wrapped) is None


# ---- the hook -------------------------------------------------------------------------------------


def test_apply_installs_the_hook():
    compat.apply()
    # torch.distributed.init_process_group (run by other tests in this process) wraps the hook it finds
    assert sys.excepthook is compat._excepthook or sys.excepthook.__name__ == "_distributed_excepthook"


@pytest.fixture
def previous_hook(monkeypatch):
    """Calls that reach the hook mue.compat replaced (the normal traceback printer)."""
    calls = []
    monkeypatch.setitem(compat.ORIGINALS, "sys.excepthook", lambda *args: calls.append(args))
    monkeypatch.delenv("MUE_DEBUG", raising=False)
    return calls


def test_hook_prints_user_errors_as_one_line(previous_hook, capsys):
    err = dataloader_reraised(DataError("a.tsv:3: bad row"))
    compat._excepthook(type(err), err, err.__traceback__)
    assert capsys.readouterr().err == "error: a.tsv:3: bad row\n" and previous_hook == []
    lines = "the checkpoint does not fit the model (nothing was loaded):\n  missing from the checkpoint (1): w"
    compat._excepthook(CheckpointMismatchError, CheckpointMismatchError(lines), None)
    assert capsys.readouterr().err == f"error: {lines}\n"


def test_hook_passes_other_errors_and_debug_runs_on(previous_hook, capsys, monkeypatch):
    bug = RuntimeError("a bug")
    compat._excepthook(RuntimeError, bug, None)
    assert previous_hook == [(RuntimeError, bug, None)]
    monkeypatch.setenv("MUE_DEBUG", "1")
    ours = DataError("a.tsv:3: bad row")
    compat._excepthook(DataError, ours, None)
    assert previous_hook[-1] == (DataError, ours, None) and capsys.readouterr().err == ""
