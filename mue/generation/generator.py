"""fairseq's beam search / greedy decoding, with MuE's exits switched on for the duration.

fairseq's SequenceGenerator keeps its own batching, beams and length limits; the model does the
per-row exits inside each call (encoder streams, then one decoder layer stack per step). This class
opens an exit session (mue.exiting.session) per batch with the generator's ExitConfig, times it,
turns what ran into ExitStats, and replaces fairseq's n-gram blocker, whose CPU fallback blocks
nothing (mue.generation.ngram_blocking).
"""
import contextlib
import time

import torch
from fairseq.sequence_generator import SequenceGenerator

from mue.exiting.accounting import account, arch_sizes, model_sizes, new_stats
from mue.exiting.config import exit_config as read_exit_config
from mue.exiting.session import check_models, exit_session
from mue.exiting.settings import ExitSettings
from mue.models.image_reuse import ImageStreamCache

from .ngram_blocking import NGramBlocker


class MueSequenceGenerator(SequenceGenerator):
    """fairseq's SequenceGenerator over mue models with exits under ``exit_config`` (an ExitConfig, or
    anything `mue.exiting.config.exit_config` reads; None: no exits). ``reference_arch``: count Eq. 14
    and FLOPs against that (larger) registered arch, e.g. for an OFA-Tiny baseline
    (mue.exiting.accounting.arch_sizes). ``image_cache_size``: keep the image streams of that many recent
    images across batches (mue.models.image_reuse.ImageStreamCache; 0: off)."""

    def __init__(self, models, tgt_dict, exit_config=None, reference_arch=None, image_cache_size=0, **kwargs):
        check_models(models, "MueSequenceGenerator")
        super().__init__(models, tgt_dict, **kwargs)
        self.bos = tgt_dict.bos()  # OFA's targets start with <s> (fairseq's generator would start with </s>)
        self.exit_config = read_exit_config(exit_config)
        settings = ExitSettings.from_config(self.exit_config)
        self.mue_models = list(models)
        if settings.dec_rule.uses_heads:
            for model in self.mue_models:
                settings.dec_rule.heads(model.decoder)  # a clear error now if the heads are missing
        if self.repeat_ngram_blocker is not None:
            self.repeat_ngram_blocker = NGramBlocker(self.repeat_ngram_blocker.no_repeat_ngram_size)
        self.sizes = model_sizes(self.mue_models[0])
        self.reference_sizes = arch_sizes(reference_arch, self.sizes["vocab"]) if reference_arch else None
        self.stats = new_stats(self.mue_models[0], reference_sizes=self.reference_sizes)
        self.image_cache = ImageStreamCache(image_cache_size) if image_cache_size else None

    def reset_stats(self):
        self.stats = new_stats(self.mue_models[0], reference_sizes=self.reference_sizes)

    @contextlib.contextmanager
    def exits_attached(self):
        """Within the block the models exit early; the block's wall-clock time (device work included)
        and what ran are added to `self.stats`. Used by generation and answer scoring."""
        device = next(self.mue_models[0].parameters()).device
        with exit_session(self.mue_models, self.exit_config, image_cache=self.image_cache) as settings:
            _synchronize(device)
            start = time.perf_counter()
            yield settings
            _synchronize(device)
            self.stats.add_time(time.perf_counter() - start)
        account(self.stats, settings.trace, self.sizes, self.reference_sizes)

    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        with self.exits_attached():
            return super()._generate(sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                     bos_token=self.bos if bos_token is None else bos_token)


def _synchronize(device: torch.device):
    """Wait for queued device work, so that the clock measures compute, not kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
