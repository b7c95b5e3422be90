"""The `mue_ofa` model and its architectures; `build_arch` builds one without data or a task."""
import argparse
from types import SimpleNamespace

from .mue_ofa import ARCH_FILLERS, ARCHS, MueOFAConfig, MueOFAModel  # noqa: F401 (registers with fairseq)


def build_arch(name: str, dictionary=None, **overrides) -> MueOFAModel:
    """Build a registered arch (e.g. "mue_ofa_base") for tests, notebooks and scripts.

    dictionary: a fairseq Dictionary; None uses a placeholder with OFA's 59,457 entries.
    overrides: any MueOFAConfig field (e.g. encoder_mode="joint", dropout=0.0).
    """
    if name not in ARCH_FILLERS:
        raise ValueError(f"unknown arch {name!r}; choose from {sorted(ARCH_FILLERS)}")
    unknown = set(overrides) - set(MueOFAConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)} for {name}")
    if dictionary is None:
        from mue.data.dictionary import placeholder_ofa_dictionary

        dictionary = placeholder_ofa_dictionary()
    args = argparse.Namespace(**overrides)
    ARCH_FILLERS[name](args)
    cfg = MueOFAConfig()
    for key, value in vars(args).items():
        setattr(cfg, key, value)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return MueOFAModel.build_model(cfg, task)
