"""exit_session: the only way a model runs with exits.

    with exit_session(model, exit_config(img_thres=0.9)) as settings:
        model(**net_input)
    stats = account(new_stats(model), settings.trace, model_sizes(model))

Inside the block the model (and every model given, for ensembles) exits under the settings, and a
fresh ExitTrace records what ran; afterwards the model is back to what it was (no exits), even when
the block raised. Generation, answer scoring, validation, the benchmark and the tests all use it, so
no caller sets exit attributes on a model and none can leak exits into a later forward pass.
"""
import contextlib
from typing import Iterable, Optional, Union

from mue.errors import UserError

from .settings import ExitSettings
from .trace import ExitTrace


class NotAMueModelError(UserError, TypeError):
    """Exits need a mue_ofa model; the message names what was given."""


def unwrap(model):
    """The mue model inside fairseq's / torch's wrappers (DistributedDataParallel & co. keep it as
    ``.module``); a clear error when there is none."""
    from mue.models.mue_ofa import MueOFAModel  # here: mue.models imports mue.exiting

    inner = model
    while not isinstance(inner, MueOFAModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, MueOFAModel):
        raise NotAMueModelError(
            f"early exits need a mue_ofa model (mue.models.MueOFAModel, built with --arch mue_ofa_*), got "
            f"{type(model).__module__}.{type(model).__name__}")
    return inner


@contextlib.contextmanager
def exit_session(models, config=None, trace: Optional[ExitTrace] = None, image_cache=None):
    """Run ``models`` (one model or several) with exits for the block; yields the ExitSettings, whose
    ``trace`` holds what ran. ``config``: an ExitConfig (or anything mue.exiting.config.exit_config
    reads: a task config, a dict, None for the defaults), or ready ExitSettings (shared, e.g. by the
    models of an ensemble); ``trace``: the trace to record into (default: a fresh one); ``image_cache``:
    an ImageStreamCache (mue.models.image_reuse) the encoder reads and fills across calls."""
    many = list(models) if isinstance(models, (list, tuple)) else [models]
    inner = [unwrap(m) for m in many]
    settings = _settings(config, trace)
    if image_cache is not None:
        settings.image_cache = image_cache
    with contextlib.ExitStack() as stack:
        for model in inner:
            stack.enter_context(model.exiting(settings))
        yield settings


def _settings(config: Union[None, ExitSettings, object], trace: Optional[ExitTrace]) -> ExitSettings:
    if isinstance(config, ExitSettings):
        if trace is not None:
            config.trace = trace
        elif config.trace is None:
            config.trace = ExitTrace()
        return config
    return ExitSettings.from_config(config, trace=ExitTrace() if trace is None else trace)


def check_models(models: Iterable, who: str):
    """Raise NotAMueModelError naming ``who`` unless every model is a mue model."""
    for model in models:
        try:
            unwrap(model)
        except NotAMueModelError as err:
            raise NotAMueModelError(f"{who}: {err}") from None
