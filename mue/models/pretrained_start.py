"""Does a training run start from pretrained weights? And the warning for ``--freeze-embeddings`` without them.

mue_ofa ties the token embedding to the output projection, so ``--freeze-embeddings`` (OFA's choice when
fine-tuning its pretrained weights) on a randomly initialised model freezes a random output layer for the
whole run. Where the weights come from is decided by the training config's ``checkpoint`` section, which
fairseq reads after the model is built; the model config handed to ``build_model`` is a node of that full
config, so it can be read there (fairseq's ``load_checkpoint`` rules: --finetune-from-model, a non-default
--restore-file, --continue-once, or the save dir's checkpoint_last.pt, which resumes a run).
"""
import logging
import os
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"


def pretrained_start(model_cfg) -> Optional[str]:
    """Where the run's weights will be loaded from, read off the full config ``model_cfg`` belongs to:
    e.g. ``"--finetune-from-model X"``; ``""`` when nothing is loaded (random initialisation); None when
    no training config can be reached (a model built outside fairseq-train, e.g. in Python)."""
    try:
        parent = model_cfg._get_parent() if OmegaConf.is_config(model_cfg) else None
        ckpt = parent.get("checkpoint") if OmegaConf.is_dict(parent) else None
        if not OmegaConf.is_dict(ckpt):
            return None
        if ckpt.get("finetune_from_model"):
            return f"--finetune-from-model {ckpt.finetune_from_model}"
        restore = ckpt.get("restore_file") or DEFAULT_RESTORE_FILE
        if restore != DEFAULT_RESTORE_FILE:
            return f"--restore-file {restore}"
        if ckpt.get("continue_once"):
            return f"--continue-once {ckpt.continue_once}"
        last = os.path.join(ckpt.get("save_dir") or "checkpoints", DEFAULT_RESTORE_FILE)
    except OmegaConfBaseException:  # a mandatory value still missing (???): cannot tell
        return None
    return f"resuming {last}" if os.path.exists(last) else ""


def warn_if_frozen_from_scratch(model_cfg) -> bool:
    """Log a warning (and return True) when ``model_cfg`` freezes the embeddings of a model that starts
    from random initialisation; quiet when it loads weights or when that cannot be told."""
    if not getattr(model_cfg, "freeze_embeddings", False) or pretrained_start(model_cfg) != "":
        return False
    logger.warning(
        "--freeze-embeddings (model.freeze_embeddings) on a model that starts from random initialisation (no "
        "--finetune-from-model or --restore-file): the token embedding, tied to the output projection, stays "
        "random for the whole run. Freeze it only when fine-tuning pretrained (OFA) weights.")
    return True
