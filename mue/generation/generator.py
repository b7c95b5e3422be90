"""fairseq's beam search / greedy decoding, with MuE's exits switched on for the duration.

fairseq's SequenceGenerator keeps its own batching, beams, length limits and n-gram blocking; the
model does the per-row exits inside each call (encoder streams, then one decoder layer stack per
step). This class only attaches the exit settings with the decoder threshold schedule sized for the
batch's maximum length N, times the call, and turns what ran into ExitStats.
"""
import contextlib
import time

from fairseq.sequence_generator import SequenceGenerator

from mue.exiting.accounting import account, arch_sizes, model_sizes, new_stats
from mue.exiting.baselines import make_decoder_rule
from mue.exiting.policy import validate_threshold
from mue.exiting.schedule import ThresholdSchedule
from mue.exiting.settings import ExitSettings
from mue.exiting.trace import ExitTrace


def exit_settings_from_cfg(cfg) -> dict:
    """The exit knobs of a task config, as keyword arguments for MueSequenceGenerator."""
    return {
        "img_thres": cfg.img_thres,
        "txt_thres": cfg.txt_thres,
        "dec_thres": cfg.dec_thres,
        "dec_schedule": cfg.dec_schedule,
        "dec_decay_beta": cfg.dec_decay_beta,
        "dec_decay_tau": cfg.dec_decay_tau,
        "kv_policy": cfg.kv_policy,
        "exit_policy": getattr(cfg, "exit_policy", "cosine"),
        "exit_entropy": getattr(cfg, "exit_entropy", 0.0),
        "exit_patience": getattr(cfg, "exit_patience", 0),
    }


def make_settings(img_thres=1.0, txt_thres=1.0, dec_thres=1.0, dec_schedule="constant", dec_decay_beta=0.95,
                  dec_decay_tau=1.0, kv_policy="copy", max_len=1, trace=None, exit_policy="cosine",
                  exit_entropy=0.0, exit_patience=0) -> ExitSettings:
    """ExitSettings with a decoder schedule over N = max_len steps and the decoder exit rule of
    `exit_policy` (mue.exiting.baselines; --dec-thres is the cosine rule's knob only)."""
    dec_thres = validate_threshold(dec_thres, "--dec-thres")
    schedule = ThresholdSchedule.from_args(dec_schedule, dec_thres, dec_decay_beta, dec_decay_tau, max(1, max_len))
    if exit_policy != "cosine" and not schedule.never_exits:
        raise ValueError(f"--dec-thres < 1 is the cosine rule's knob; --exit-policy {exit_policy} exits by "
                         + ("--exit-patience" if exit_policy == "patience" else "--exit-entropy"))
    rule = make_decoder_rule(exit_policy, exit_entropy, exit_patience)
    return ExitSettings(img_thres=img_thres, txt_thres=txt_thres, dec_rule=rule,
                        dec_schedule=None if schedule.never_exits else schedule, kv_policy=kv_policy, trace=trace)


class MueSequenceGenerator(SequenceGenerator):
    """`reference_arch`: count Eq. 14 and FLOPs against that (larger) registered arch, e.g. when the
    models are an OFA-Tiny baseline (mue.exiting.accounting.arch_sizes)."""

    def __init__(self, models, tgt_dict, exit_kwargs=None, reference_arch=None, **kwargs):
        super().__init__(models, tgt_dict, **kwargs)
        self.bos = tgt_dict.bos()  # OFA's targets start with <s> (fairseq's generator would start with </s>)
        self.exit_kwargs = dict(exit_kwargs or {})
        settings = make_settings(**self.exit_kwargs)  # validate the knobs now, not at the first batch
        self.mue_models = list(models)
        if settings.dec_rule.uses_heads:
            for model in self.mue_models:
                settings.dec_rule.heads(model.decoder)  # a clear error now if the heads are missing
        self.sizes = model_sizes(self.mue_models[0])
        self.reference_sizes = arch_sizes(reference_arch, self.sizes["vocab"]) if reference_arch else None
        self.stats = new_stats(self.mue_models[0], reference_sizes=self.reference_sizes)

    def reset_stats(self):
        self.stats = new_stats(self.mue_models[0], reference_sizes=self.reference_sizes)

    @contextlib.contextmanager
    def exits_attached(self, max_len: int):
        """Within the block the models exit early (decoder schedule over N = max_len steps); the block's
        wall-clock time and what ran are added to `self.stats`. Used by generation and answer scoring."""
        trace = ExitTrace()
        settings = make_settings(**self.exit_kwargs, max_len=max_len, trace=trace)
        for model in self.mue_models:
            model.set_exit_settings(settings)
        try:
            start = time.perf_counter()
            yield settings
            self.stats.add_time(time.perf_counter() - start)
        finally:
            for model in self.mue_models:
                model.set_exit_settings(None)
        account(self.stats, trace, self.sizes, self.reference_sizes)

    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        src_len = int(sample["net_input"]["src_tokens"].size(1))
        max_len = min(int(self.max_len_a * src_len + self.max_len_b), self.max_len - 1)
        with self.exits_attached(max_len):
            return super()._generate(sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                     bos_token=self.bos if bos_token is None else bos_token)
