"""What a model reads at inference to exit early: ExitSettings, the run-time form of an ExitConfig.

ExitConfig (mue.exiting.config) is what the user set; ExitSettings adds what a run needs: the decoder
threshold schedule, the decoder's exit rule, the cosine policy of the encoder streams, and the trace
that records what ran. Its constructor is the one place that turns a config into them. A model only
sees settings inside `mue.exiting.session.exit_session`; training never sets them (every layer runs).
"""
from typing import Optional

from .baselines import DecoderExitRule, DepthLimit, make_decoder_rule
from .config import KV_POLICIES, NEVER_EXIT, exit_config  # noqa: F401  (KV_POLICIES: re-export)
from .policy import CosineExitPolicy
from .schedule import ThresholdSchedule
from .trace import ExitTrace


class ExitSettings:
    """``config``: an ExitConfig or anything `exit_config` reads (None: no exits); ``trace``: where the
    model records what ran; ``dec_rule``: a ready decoder exit rule instead of the config's (tests and
    baselines with hand-made rules)."""

    def __init__(self, config=None, trace: Optional[ExitTrace] = None, dec_rule: Optional[DecoderExitRule] = None):
        self.config = exit_config(config)
        self.trace = trace
        self.image_cache = None  # an ImageStreamCache for the session (mue.models.image_reuse), if any
        self.policy = CosineExitPolicy()
        schedule = ThresholdSchedule.from_config(self.config)
        self.dec_schedule = None if schedule.never_exits else schedule  # None: the cosine rule never exits
        self.dec_rule = dec_rule if dec_rule is not None else make_decoder_rule(
            self.config.exit_policy, self.config.exit_entropy, self.config.exit_patience, cosine=self.policy)
        if self.config.exit_depth:
            self.dec_rule = DepthLimit(self.dec_rule, self.config.exit_depth)

    @classmethod
    def from_config(cls, config, trace: Optional[ExitTrace] = None) -> "ExitSettings":
        return cls(config, trace)

    @property
    def img_thres(self) -> float:
        return self.config.img_thres

    @property
    def txt_thres(self) -> float:
        return self.config.txt_thres

    @property
    def exit_depth(self) -> Optional[int]:
        """--exit-depth: the most layers any stream runs (None: no limit)."""
        return self.config.exit_depth or None

    @property
    def kv_policy(self) -> str:
        return self.config.kv_policy

    @property
    def dec_compaction(self) -> str:
        return self.config.dec_compaction

    @property
    def compact_rows(self) -> bool:
        """Whether a generation step runs each decoder layer on the active rows only (--dec-compaction)."""
        return self.config.dec_compaction == "rows"

    @property
    def joint_thres(self) -> float:
        """Joint (non-decomposed) encoder: one exit for both modalities; it exits only where both
        streams' thresholds would allow it (the larger threshold)."""
        return max(self.img_thres, self.txt_thres)

    def dec_threshold(self, step: int) -> float:
        return NEVER_EXIT if self.dec_schedule is None else float(self.dec_schedule(step))

    def __repr__(self):
        return f"ExitSettings({self.config!r}, dec_rule={self.dec_rule!r})"
