"""Official-OFA checkpoints: strict loading, conversion, and fine-tuning from the converted file.

No OFA checkpoint can be downloaded here, so the tests write checkpoints in OFA's layout: the model's
own state dict (whose names equal OFA's, see test_model.py) plus the derived buffers OFA also saves,
pickled with an argparse Namespace the way OFA's fairseq fork does.
"""
import argparse
import logging

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from mue.checkpoints.convert_ofa import main as convert_main
from mue.checkpoints.ofa import infer_arch, load_into_arch
from mue.models import build_arch
from mue.models.state_dict import CheckpointMismatchError
from ofa_reference import randomize_


def write_ofa_checkpoint(path, model, drop=(), extra=None):
    """A checkpoint as OFA writes it: old-style pickle with `args`, derived buffers included."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in drop}
    for side in ("encoder", "decoder"):
        state[f"{side}.version"] = torch.tensor([3.0])
        state[f"{side}.token_rp_bucket"] = torch.zeros(1024, 1024, dtype=torch.long)  # recomputed, never trusted
    state["decoder.image_position_idx"] = torch.arange(1026)
    state.update(extra or {})
    torch.save({"args": argparse.Namespace(arch="ofa_tiny", task="caption"), "model": state,
                "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion",
                                       "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}, "num_updates": 9}],
                "extra_state": {"epoch": 3}}, path)


@pytest.fixture(scope="module")
def tiny_ofa(tmp_path_factory):
    """mue_ofa_tiny on OFA's full 59,457-entry vocabulary, randomised, saved in OFA's layout."""
    torch.manual_seed(0)
    model = build_arch("mue_ofa_tiny", dropout=0.0).eval()
    randomize_(model, seed=2)
    path = tmp_path_factory.mktemp("ofa") / "ofa_tiny.pt"
    write_ofa_checkpoint(path, model)
    return model, path


def test_official_layout_loads_strictly_and_infers_the_arch(tiny_ofa):
    model, path = tiny_ofa
    loaded = load_into_arch(str(path), dropout=0.0).eval()
    assert infer_arch(torch.load(path, weights_only=False)["model"]) == "mue_ofa_tiny"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # the derived bucket table in the file (all zeros) was ignored, not loaded
    assert loaded.encoder.token_rp_bucket.max() > 0


def test_convert_writes_a_weights_only_checkpoint(tiny_ofa, tmp_path, capsys):
    model, path = tiny_ofa
    out = tmp_path / "converted.pt"
    assert convert_main([str(path), str(out)]) == 0
    assert "mue_ofa_tiny" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)  # the safe path works on the converted file
    assert state["mue_arch"] == "mue_ofa_tiny"
    fresh = build_arch("mue_ofa_tiny")
    fresh.load_state_dict(state["model"], strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    checkpoint_utils.load_checkpoint_to_cpu(str(out))  # fairseq's own loader accepts it


def test_wrong_vocabulary_and_missing_layer_fail_clearly(tiny_ofa, tmp_path, capsys):
    model, _ = tiny_ofa
    small = tmp_path / "small_vocab.pt"
    state = dict(model.state_dict())
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        state[k] = state[k][:50000]
    torch.save({"model": state}, small)
    with pytest.raises(CheckpointMismatchError, match="vocabulary size differs"):
        load_into_arch(str(small), "mue_ofa_tiny")
    missing = tmp_path / "missing_layer.pt"
    write_ofa_checkpoint(missing, model, drop=[k for k in model.state_dict() if k.startswith("decoder.layers.3.")])
    assert convert_main([str(missing), str(tmp_path / "x.pt"), "--arch", "mue_ofa_tiny"]) == 1
    err = capsys.readouterr().err
    assert "missing from the checkpoint" in err and "decoder.layers.3.fc1.weight" in err
    assert not (tmp_path / "x.pt").exists()
    assert convert_main([str(tmp_path / "nope.pt"), str(tmp_path / "y.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_finetune_from_converted_checkpoint(tmp_path, caplog):
    """fairseq-train --finetune-from-model with a converted OFA-layout checkpoint starts from its weights."""
    from fairseq_cli import train

    from mue.data.synthetic import generate
    from mue.data.dictionary import build_ofa_dictionary

    data = tmp_path / "data"
    generate(str(data), num_train=4, num_valid=2, num_test=2, image_size=32)
    dictionary = build_ofa_dictionary(str(data / "dict.txt"))
    torch.manual_seed(1)
    source = build_arch("mue_ofa_micro", dictionary, dropout=0.0)
    ofa = tmp_path / "ofa_micro.pt"
    write_ofa_checkpoint(ofa, source)
    converted = tmp_path / "converted.pt"
    # the micro arch is not an OFA size, so it is named explicitly
    assert convert_main([str(ofa), str(converted), "--arch", "mue_ofa_micro"]) == 0
    save = tmp_path / "save"
    argv = [str(data / "caption"), "--user-dir", "mue", "--task", "mue_caption", "--arch", "mue_ofa_micro",
            "--patch-image-size", "32", "--criterion", "mue", "--optimizer", "adam", "--lr", "0.0",
            "--max-update", "1", "--batch-size", "2", "--cpu", "--num-workers", "0", "--save-dir", str(save),
            "--finetune-from-model", str(converted), "--disable-validation", "--dropout", "0.0"]
    with caplog.at_level(logging.INFO):
        train.main(convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv)))
    trained = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))["model"]
    # lr 0: the saved parameters are exactly the converted ones, so they were loaded, not re-initialised
    # (BatchNorm running statistics are buffers that a training-mode step updates, so they are not compared)
    for name, value in source.named_parameters():
        assert torch.equal(trained[name], value), name
    assert "loaded checkpoint" in caplog.text.lower() or "finetune" in caplog.text.lower()
