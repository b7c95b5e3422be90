"""Open a checkpoint for the API: the model, the task(s) it answers with, and the dictionary it needs.

Two kinds of file are accepted:
  * a ``fairseq-train`` checkpoint of mue (task ``mue_caption`` or ``mue_snli_ve``): loaded with fairseq's
    ``load_model_ensemble_and_task`` and the checkpoint's own task options (image size, dictionary layout,
    prompts), as fairseq-generate loads it;
  * an official OFA checkpoint converted with ``python -m mue.checkpoints.convert_ofa`` (weights and
    arch only): both tasks are built on it, with OFA's defaults for the task options.
Everything is read the safe (weights-only) way; an unconverted OFA pickle is refused with the command
that converts it. The dictionary is the training data's ``dict.txt`` (found next to the data the
checkpoint was trained on) or the one given; it must make exactly as many tokens as the checkpoint
has embeddings, else nothing is loaded.
"""
import os
from dataclasses import MISSING, dataclass, fields
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from mue.data.dictionary import OFA_NUM_BINS, OFA_NUM_CODES, build_ofa_dictionary
from mue.data.readers import DataError
from mue.errors import OptionError
from mue.models import ARCHS, build_arch
from mue.models.state_dict import CheckpointMismatchError

#: fairseq task name -> what the API calls it
TASKS = {"mue_caption": "caption", "mue_snli_ve": "snli_ve"}
CONVERT = "python -m mue.checkpoints.convert_ofa {path} CONVERTED.pt"


@dataclass
class OpenedCheckpoint:
    model: torch.nn.Module
    tasks: Dict[str, object]  # "caption" / "snli_ve" -> the fairseq task that prepares inputs and answers
    trained_for: Optional[str]  # the fairseq task of a fine-tuned checkpoint; None for converted OFA weights
    arch: str
    dict_file: str


def open_checkpoint(path: str, dict_file: Optional[str] = None, image_size: Optional[int] = None,
                    task_options: Optional[dict] = None) -> OpenedCheckpoint:
    """Load ``path`` on the CPU (see the module docstring). ``image_size``: resize images to this side
    instead of the checkpoint's own setting; ``task_options``: other task options to override (e.g.
    ``{"add_premise": True}``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OptionError(f"checkpoint {path}: file not found")
    state = _peek(path)
    overrides = dict(task_options or {})
    if image_size is not None:
        overrides["patch_image_size"] = int(image_size)
    cfg = state.get("cfg")
    if cfg is not None:
        task_name, arch = _trained_kind(path, cfg)
        task_cfg = cfg["task"]
        unknown = set(overrides) - set(task_cfg)
        if unknown:
            raise OptionError(f"unknown task option(s) {sorted(unknown)} for {task_name}")
        dict_path = dict_file or _find_dictionary(path, task_cfg)
        codes, bins = (int(default if task_cfg.get(name) is None else task_cfg.get(name))
                       for name, default in (("num_codes", OFA_NUM_CODES), ("num_bins", OFA_NUM_BINS)))
        _check_vocabulary(path, state, dict_path, codes, bins)
        return _load_trained(path, task_name, arch, dict_path, overrides)
    if "mue_arch" in state:
        arch = state["mue_arch"]
        if arch not in ARCHS:
            raise CheckpointMismatchError(f"{path}: converted for arch {arch!r}, which is not a mue_ofa arch "
                                          f"({', '.join(ARCHS)})")
        if not dict_file:
            raise DataError(f"{path} is a converted OFA checkpoint, which holds no dictionary: give the dict.txt "
                            "its weights were trained with (--dict; OFA's dict.txt for official OFA weights)")
        codes, bins = _ofa_layout(path, state, dict_file)
        return _load_converted(path, state, arch, dict_file, codes, bins, overrides)
    args = state.get("args")
    if args is not None:
        raise CheckpointMismatchError(
            f"{path}: a checkpoint of arch {getattr(args, 'arch', '?')!r} and task {getattr(args, 'task', '?')!r} "
            f"in fairseq's older layout; if it is an official OFA checkpoint, convert it once: "
            f"{CONVERT.format(path=path)}")
    raise CheckpointMismatchError(f"{path}: neither a mue fairseq-train checkpoint (no task config) nor a converted "
                                  f"OFA checkpoint ({CONVERT.format(path=path)})")


def _peek(path: str) -> dict:
    """The checkpoint's contents, read weights-only (tensors memory-mapped where the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any reason the safe loader gives is reported the same way)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointMismatchError(
            f"{path}: cannot be read as a checkpoint the safe way ({reason}); an official OFA checkpoint is an "
            f"old pickle: convert it once with {CONVERT.format(path=path)} (this runs code stored in the file: "
            "only for files you trust)") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointMismatchError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    return state


def _trained_kind(path: str, cfg) -> tuple:
    """(task name, arch) of a fairseq-train checkpoint; an error unless it is mue_ofa on a mue task."""
    task = (cfg.get("task") or {}).get("_name")
    arch = (cfg.get("model") or {}).get("_name")
    if arch != "mue_ofa" and arch not in ARCHS:
        raise CheckpointMismatchError(f"{path}: a checkpoint of arch {arch!r}; the API runs mue_ofa models "
                                      f"({', '.join(ARCHS)})")
    if task not in TASKS:
        raise CheckpointMismatchError(f"{path}: trained for task {task!r}; the API answers with checkpoints of "
                                      f"{' or '.join(TASKS)} (or converted OFA weights)")
    return task, arch


def _find_dictionary(path: str, task_cfg) -> str:
    """The dict.txt the checkpoint was trained with: its --dict-file, else {data}/dict.txt or
    {data}/../dict.txt, the data folder taken as saved and relative to the checkpoint's folder."""
    tried = []
    saved = task_cfg.get("dict_file")
    data = task_cfg.get("data")
    if saved:
        tried.append(saved)
    if data:
        for root in dict.fromkeys([data, os.path.join(os.path.dirname(os.path.abspath(path)), data)]):
            tried += [os.path.join(root, "dict.txt"), os.path.join(root, os.pardir, "dict.txt")]
    for candidate in tried:
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    where = f"tried {', '.join(os.path.normpath(p) for p in tried)}" if tried else "the checkpoint names no data folder"
    raise DataError(f"{path}: no dictionary found ({where}); give the dict.txt it was trained with (--dict)")


def _vocabulary_rows(path: str, state: dict) -> int:
    weight = state["model"].get("encoder.embed_tokens.weight")
    if weight is None:
        raise CheckpointMismatchError(f"{path}: no encoder.embed_tokens.weight: not an OFA/mue model")
    return int(weight.shape[0])


def _text_entries(dict_path: str) -> int:
    """Entries of a dictionary before OFA's image codes and location bins (specials, dict.txt, <mask>)."""
    return len(build_ofa_dictionary(dict_path, 0, 0))  # DataError naming file:line if it is no dict.txt


def _check_vocabulary(path: str, state: dict, dict_path: str, codes: int, bins: int) -> None:
    rows, text = _vocabulary_rows(path, state), _text_entries(dict_path)
    if rows != text + codes + bins:
        raise CheckpointMismatchError(
            f"{path}: the dictionary {dict_path} does not belong to it: with {codes} image codes and {bins} location "
            f"bins it makes {text + codes + bins} tokens, the checkpoint has {rows} token embeddings; give the "
            "dict.txt it was trained with (--dict)")


def _ofa_layout(path: str, state: dict, dict_path: str) -> tuple:
    """(image codes, location bins) of converted weights: OFA's 8192 and 1000, or none (mue's small data)."""
    rows, text = _vocabulary_rows(path, state), _text_entries(dict_path)
    for codes, bins in ((OFA_NUM_CODES, OFA_NUM_BINS), (0, 0)):
        if rows == text + codes + bins:
            return codes, bins
    raise CheckpointMismatchError(
        f"{path}: the dictionary {dict_path} does not belong to it: it makes {text} text tokens, {text} + "
        f"{OFA_NUM_CODES} codes + {OFA_NUM_BINS} bins = {text + OFA_NUM_CODES + OFA_NUM_BINS} with OFA's layout, "
        f"but the checkpoint has {rows} token embeddings; give the dict.txt it was trained with (--dict)")


def _load_trained(path, task_name, arch, dict_path, overrides) -> OpenedCheckpoint:
    from fairseq import checkpoint_utils

    overrides = {"data": os.path.dirname(os.path.abspath(dict_path)), "dict_file": dict_path, **overrides}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    return OpenedCheckpoint(models[0].eval(), {TASKS[task_name]: task}, task_name, arch, dict_path)


def _load_converted(path, state, arch, dict_path, codes, bins, overrides) -> OpenedCheckpoint:
    from fairseq import tasks as fairseq_tasks

    from mue.tasks import CaptionConfig, SnliVeConfig

    built = {}
    for kind, (name, config_class) in {"caption": ("mue_caption", CaptionConfig),
                                       "snli_ve": ("mue_snli_ve", SnliVeConfig)}.items():
        options = {f.name: f.default if f.default is not MISSING else f.default_factory()
                   for f in fields(config_class)}
        options.update(_name=name, data=os.path.dirname(os.path.abspath(dict_path)), dict_file=dict_path,
                       num_codes=codes, num_bins=bins, train_subset="train", seed=1)
        unknown = set(overrides) - set(options)
        if unknown:
            raise OptionError(f"unknown task option(s) {sorted(unknown)}")
        options.update({k: v for k, v in overrides.items() if k in options})
        built[kind] = fairseq_tasks.setup_task(OmegaConf.create(options))
    model = build_arch(arch, dictionary=built["caption"].source_dictionary)
    model.load_state_dict(state["model"], strict=True)  # CheckpointMismatchError listing every misfit
    return OpenedCheckpoint(model.eval(), built, None, arch, dict_path)
