"""The exit settings' one owner (ExitConfig), the exit session, and honest accounting of the teacher-forced
decoder: what the trace records is what ran."""
import os
import re
from pathlib import Path

import pytest
import torch

from mue.errors import OptionError
from mue.exiting.accounting import account, model_sizes, new_stats
from mue.exiting.config import DEFAULTS, EXIT_KNOBS, ExitConfig, as_record, exit_config, option
from mue.exiting.session import NotAMueModelError, exit_session
from mue.models import build_arch
from ofa_reference import randomize_, tiny_dictionary

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), dropout=0.0), seed=1).eval()


def _inputs(bsz=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 44, (bsz, 6), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    prev = torch.randint(4, 44, (bsz, length), generator=g)
    prev[:, 0] = 0
    return src, torch.randn(bsz, 3, 48, 48, generator=g), prev


# ---- one owner ---------------------------------------------------------------------------------------------
def test_each_exit_knob_is_declared_in_one_file():
    declared = {}
    for path in (ROOT / "mue").rglob("*.py"):
        for knob in EXIT_KNOBS:
            if re.search(rf"^\s+{knob}\s*:", path.read_text(), re.M):
                declared.setdefault(knob, []).append(path.relative_to(ROOT).as_posix())
    assert declared == {knob: ["mue/exiting/config.py"] for knob in EXIT_KNOBS}


@pytest.mark.parametrize("knob,value,message", [
    ("img_thres", -5, "--img-thres must be a number in"),
    ("dec_thres", "nan", "--dec-thres must be a number in"),
    ("dec_decay_beta", 2, r"--dec-decay-beta must be in \[0, 1\]"),
    ("dec_decay_tau", float("inf"), "--dec-decay-tau must be a finite number >= 0"),
    ("dec_decay_len", 0, "--dec-decay-len must be an integer >= 1"),
    ("exit_patience", -3, "--exit-patience must be an integer >= 0"),
    ("kv_policy", "keep", "--kv-policy must be one of copy, recompute, drop"),
    ("dec_schedule", "linear", "--dec-schedule must be one of"),
])
def test_bad_values_name_their_option(knob, value, message):
    with pytest.raises(OptionError, match=message):
        exit_config(**{knob: value})


def test_exit_config_reads_any_config_and_records_every_knob():
    from argparse import Namespace

    config = exit_config(Namespace(img_thres="0.9", dec_schedule="decay", unrelated=3), dec_decay_len=12)
    assert isinstance(config, ExitConfig) and config.img_thres == 0.9 and config.dec_decay_len == 12
    record = as_record(config)
    assert list(record) == list(EXIT_KNOBS) and record["dec_schedule"] == "decay"
    assert as_record(None) == DEFAULTS
    with pytest.raises(OptionError, match="unknown exit knobs"):
        exit_config(img_thresh=0.9)


def test_readme_contract_and_help_agree_on_the_knobs(tmp_path):
    import subprocess
    import sys

    from fairseq import options

    import mue  # noqa: F401  (registers the tasks)

    argv = ["--user-dir", str(ROOT / "mue"), "--task", "mue_caption"]
    args = options.parse_args_and_arch(options.get_generation_parser(), [str(tmp_path), *argv])
    help_text = subprocess.run([sys.executable, "-m", "fairseq_cli.generate", *argv, "--help"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    contract = (ROOT / "docs" / "CONTRACT.md").read_text()
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--[a-z-]+)` \| default `([^`]*)` \|", readme, re.M)}
    assert set(table) == {option(k) for k in EXIT_KNOBS}, "README's knob table lists exactly the ExitConfig knobs"
    for knob in EXIT_KNOBS:
        assert re.search(rf"^  {option(knob)} ", help_text, re.M), f"fairseq-generate --help lacks {option(knob)}"
        assert option(knob) in contract
        assert str(getattr(args, knob)) == str(DEFAULTS[knob]) == table[option(knob)]


def test_nothing_cites_a_document_outside_the_repo():
    pattern = re.compile(r"shared/docs|OFA_FACTS|TOOLCHAIN\.md|DESIGN\.md")
    offenders = [str(p.relative_to(ROOT)) for folder in ("mue", "scripts", "configs", "docs")
                 for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".yaml", ".md")
                 and pattern.search(p.read_text())]
    offenders += ["README.md"] if pattern.search((ROOT / "README.md").read_text()) else []
    assert offenders == []


# ---- the session -------------------------------------------------------------------------------------------
def test_a_session_ends_even_when_its_block_raises(model):
    src, images, prev = _inputs()
    with pytest.raises(RuntimeError, match="boom"):
        with exit_session(model, exit_config(img_thres=0.5)) as settings:
            assert model.encoder.exit_settings is settings and model.decoder.exit_settings is settings
            raise RuntimeError("boom")
    assert model.encoder.exit_settings is None and model.decoder.exit_settings is None
    with torch.no_grad():  # no exits leak into the next forward: every row runs every layer
        enc = model.encoder(src, None, images)
    assert (enc["exit_depths"][0] == len(model.encoder.layers)).all()


def test_sessions_nest_and_restore_the_outer_settings(model):
    with exit_session(model, exit_config(img_thres=0.5)) as outer:
        with exit_session(model, exit_config(img_thres=0.7)) as inner:
            assert model.encoder.exit_settings is inner and inner.img_thres == 0.7
        assert model.encoder.exit_settings is outer
    assert model.encoder.exit_settings is None


def test_a_session_needs_a_mue_model():
    with pytest.raises(NotAMueModelError, match="early exits need a mue_ofa model.*Linear"):
        with exit_session(torch.nn.Linear(2, 2), None):
            pass


# ---- honest accounting of the teacher-forced path -----------------------------------------------------------
def _rows_through_fc1(model):
    """Count the (row, position) pairs that pass each decoder layer's fc1."""
    counts = [0] * len(model.decoder.layers)
    hooks = [layer.fc1.register_forward_hook(
        lambda mod, inp, out, i=i: counts.__setitem__(i, counts[i] + inp[0].shape[:-1].numel()))
        for i, layer in enumerate(model.decoder.layers)]
    return counts, hooks


@pytest.mark.parametrize("dec_thres,kv_policy", [(-1.0, "copy"), (0.6, "copy"), (0.6, "drop"), (1.0, "copy")])
def test_teacher_forced_rows_that_ran_equal_the_rows_recorded(model, dec_thres, kv_policy):
    """A probe: 4 rows x 10 positions; each position may exit after layer 1 (theta -1: all do)."""
    src, images, prev = _inputs()
    prev[1, 7:] = model.decoder.padding_idx  # padding positions never run a layer
    counts, hooks = _rows_through_fc1(model)
    try:
        with torch.no_grad(), exit_session(model, exit_config(dec_thres=dec_thres, kv_policy=kv_policy)) as s:
            enc = model.encoder(src, None, images)
            model.decoder(prev, encoder_out=enc)
    finally:
        for hook in hooks:
            hook.remove()
    recorded = sum(int(r.depths.sum()) for r in s.trace.decoder)
    per_layer = [sum(int((r.depths > i).sum()) for r in s.trace.decoder) for i in range(len(counts))]
    assert counts == per_layer and sum(counts) == recorded
    if dec_thres == -1.0:
        assert recorded == 37  # every real position ran exactly one layer
    stats = account(new_stats(model), s.trace, model_sizes(model)).summary()
    flops = stats["flops_by_component"]
    if dec_thres < 1:
        assert stats["mean_decoder_layers"] < 6 and flops["cross_kv"]["spent"] < flops["cross_kv"]["full"]
    else:
        assert stats["mean_decoder_layers"] == 6 and flops["cross_kv"]["spent"] == flops["cross_kv"]["full"]
