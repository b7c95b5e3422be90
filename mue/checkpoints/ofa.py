"""Official OFA checkpoints -> `mue_ofa` models, with strict checking.

OFA's checkpoints are older fairseq pickles (argparse Namespaces and more) that torch >= 2.6 will
not load with `weights_only=True`. Loading them runs pickle code, so it is done only here, only on
the file the user names, through `mue.compat.load_legacy_checkpoint`: load only checkpoints you
trust (e.g. the ones OFA-Sys publishes). Converting once (`python -m mue.checkpoints.convert_ofa`)
gives a plugin checkpoint that later loads the safe way.
"""
import os

import torch

from mue.models import ARCHS, build_arch
from mue.models.state_dict import CheckpointMismatchError


def load_ofa_state_dict(path: str) -> dict:
    """The model state dict of an OFA (or plugin) checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    from mue.compat import load_legacy_checkpoint

    state = load_legacy_checkpoint(path)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(
            f"{path} is not a fairseq/OFA checkpoint (no 'model' state dict of tensors)")
    return state


def infer_arch(state_dict: dict) -> str:
    """The `mue_ofa_*` arch whose width and depth match an OFA state dict."""
    try:
        dim = state_dict["encoder.embed_tokens.weight"].shape[1]
    except KeyError as err:
        raise CheckpointMismatchError("not an OFA state dict: no encoder.embed_tokens.weight") from err
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers."))
    for name, sizes in ARCHS.items():
        if sizes["encoder_embed_dim"] == dim and sizes["encoder_layers"] == layers and name != "mue_ofa_micro":
            return name
    raise CheckpointMismatchError(
        f"no mue_ofa arch has width {dim} and {layers} encoder layers; pass --arch and overrides")


def load_into_arch(path: str, arch: str = None, dictionary=None, **overrides):
    """Build `arch` (inferred when None) and load the checkpoint into it strictly."""
    state_dict = load_ofa_state_dict(path)
    arch = arch or infer_arch(state_dict)
    model = build_arch(arch, dictionary=dictionary, **overrides)
    model.load_state_dict(state_dict, strict=True)
    return model
