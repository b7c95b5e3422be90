"""The Python API: caption your own images, or ask whether they support a statement, with MuE's exits.

    import mue
    model = mue.load("checkpoint_last.pt", img_thres=0.99, txt_thres=0.99, dec_thres=0.9)
    for c in model.caption(["cat.jpg", "dog.png"]):
        print(c.source, c.text, c.exits.token_layers, c.exits.expected_time_reduction)

The answers are fairseq-generate's on the same inputs (the task's preprocessing and generator); each
result also says where that example exited and what it saved (mue.api.results). ``python -m mue`` is
the command line on top of it.
"""
from typing import Optional

import torch

from mue.errors import OptionError
from mue.exiting.config import ExitConfig, exit_config

from .checkpoint import open_checkpoint
from .model import MueModel
from .results import Caption, Entailment, ExampleExits

__all__ = ["load", "MueModel", "Caption", "Entailment", "ExampleExits", "ExitConfig"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load(checkpoint: str, dict_file: Optional[str] = None, device="cpu", dtype=None, thresholds=None,
         image_size: Optional[int] = None, image_cache_size: int = 0, task_options: Optional[dict] = None,
         **knobs) -> MueModel:
    """Load a checkpoint for captioning / visual entailment.

    ``checkpoint``: a mue ``fairseq-train`` checkpoint (its task decides what it answers) or an official OFA
    checkpoint converted with ``python -m mue.checkpoints.convert_ofa`` (both tasks). ``dict_file``: the
    dict.txt it was trained with (found by itself for a fine-tuned checkpoint whose data folder still
    exists; required for converted OFA weights). ``device``: "cpu", "cuda", ...; ``dtype``: None (as
    saved, float32), torch.float16/bfloat16 or "fp16"/"bf16". ``thresholds`` and ``knobs``: the exit knobs
    of every call that gives none (an ExitConfig, a dict, and/or keywords such as ``img_thres=0.99``;
    validated by mue.exiting.config.exit_config; default: no exits, the full model). ``image_size``:
    resize images to this side instead of the checkpoint's setting. ``image_cache_size``: keep the image
    streams of this many recent images across calls (asking again about an image skips its encoding).
    ``task_options``: other task options to override. Errors a user can fix raise mue.errors.UserError
    subclasses with a one-line message.
    """
    config = exit_config(thresholds, **knobs)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device}: no CUDA device is available")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise OptionError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if isinstance(image_cache_size, bool) or int(image_cache_size) != image_cache_size or image_cache_size < 0:
        raise OptionError(f"image_cache_size must be an integer >= 0, got {image_cache_size!r}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise OptionError(f"image_size must be an integer >= 1, got {image_size!r}")
    opened = open_checkpoint(checkpoint, dict_file, image_size, task_options)
    opened.model.to(device)
    if dtype is not None:
        opened.model.to(dtype)
    return MueModel(opened, str(checkpoint), device, config, int(image_cache_size))
