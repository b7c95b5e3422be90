"""Console scripts: fairseq's command-line tools with this plugin, from wherever it is installed.

    mue-train DATA --task mue_caption --arch mue_ofa_base ...          = fairseq-train --user-dir PLUGIN ...
    mue-generate DATA --path ckpt.pt --gen-subset test ...              = fairseq-generate --user-dir PLUGIN ...
    mue-validate DATA --path ckpt.pt --task mue_caption ...             = fairseq-validate --user-dir PLUGIN ...
    mue-hydra-train --config-name caption_stage1_synthetic task.data=... = fairseq-hydra-train with
        common.user_dir=PLUGIN and --config-dir the configs shipped with the package

PLUGIN is the directory of the `mue` package these scripts belong to, so the commands work from any
directory and never pick up another copy by its relative name (`--user-dir mue` means ./mue). A
--user-dir / common.user_dir / --config-dir given on the command line is kept. The commands also filter
the third-party warnings a user would otherwise see first (Hydra's deprecation notices about how
fairseq calls it, and those mue.compat filters at import): this process runs fairseq's code, not the
user's, so nothing of the user's is hidden. Everything else is fairseq's own entry point, unchanged.
"""
import os
import sys
import warnings

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))

#: (category, message regex) of the warnings fairseq 0.12's own use of torch 2.14 and Hydra 1.3 raises at
#: every run; filtered in these commands' processes only. Hydra attributes some of them to the caller's
#: frame, so they are matched by message, not by module.
ENTRY_POINT_WARNINGS = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),  # fairseq's decorators, at import
    (UserWarning, r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental"),
    (UserWarning, r"\s*The version_base parameter is not specified"),
    (UserWarning, r"\s*'[\w/]+' is validated against ConfigStore schema"),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated"),
    (UserWarning, r"In '[\w/]+': Usage of deprecated keyword in package header '# @package _group_'"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),  # fairseq, on CPU
)


def config_dir() -> str:
    """The folder of the hydra configs: shipped in the package (mue/configs), else the source tree's
    configs/ next to the package (an editable install or a clone)."""
    for candidate in (os.path.join(PLUGIN_DIR, "configs"), os.path.join(os.path.dirname(PLUGIN_DIR), "configs")):
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(PLUGIN_DIR, "configs")


def quiet() -> None:
    """Install ENTRY_POINT_WARNINGS for this process (before fairseq is imported)."""
    for category, message in ENTRY_POINT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _given(argv, *options) -> bool:
    return any(a in options or a.split("=", 1)[0] in options for a in argv)


def with_user_dir(argv):
    """`argv` plus `--user-dir PLUGIN_DIR` unless it names a --user-dir."""
    return list(argv) if _given(argv, "--user-dir") else [*argv, "--user-dir", PLUGIN_DIR]


def hydra_argv(argv):
    """fairseq-hydra-train's `argv` plus `common.user_dir=PLUGIN_DIR` and `--config-dir DIR` unless given."""
    argv = list(argv)
    if not any(a.lstrip("+").startswith("common.user_dir=") for a in argv):
        argv.append(f"common.user_dir={PLUGIN_DIR}")
    if not _given(argv, "--config-dir", "-cd", "--config-path", "-cp"):
        argv = ["--config-dir", config_dir(), *argv]
    return argv


def _run(module: str, argv) -> None:
    import importlib
    import logging

    from mue import compat

    quiet()  # importing this module imported mue: its patches are in, fairseq's import was quiet already
    for handler in compat.FAIRSEQ_IMPORT_HANDLERS:  # let the tool's own logging.basicConfig take effect
        logging.getLogger().removeHandler(handler)
    sys.argv = [sys.argv[0], *argv]
    importlib.import_module(module).cli_main()


def train() -> None:
    _run("fairseq_cli.train", with_user_dir(sys.argv[1:]))


def generate() -> None:
    _run("fairseq_cli.generate", with_user_dir(sys.argv[1:]))


def validate() -> None:
    _run("fairseq_cli.validate", with_user_dir(sys.argv[1:]))


def hydra_train() -> None:
    _run("fairseq_cli.hydra_train", hydra_argv(sys.argv[1:]))
