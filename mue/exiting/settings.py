"""What a model needs at inference to exit early, in one object the task/generator attaches to it.

Training never sets it (every layer runs). Thresholds >= 1 mean "never exit" and reproduce the
full model exactly. ``dec_rule`` is the decoder's exit rule (mue.exiting.baselines: MuE's cosine by
default, or a baseline); the encoder streams always use the cosine ``policy``.
"""
from dataclasses import dataclass, field
from typing import Optional

from .baselines import DecoderExitRule, make_decoder_rule
from .policy import CosineExitPolicy, validate_threshold
from .schedule import ThresholdSchedule
from .trace import ExitTrace

KV_POLICIES = ("copy", "recompute", "drop")


@dataclass
class ExitSettings:
    img_thres: float = 1.0
    txt_thres: float = 1.0
    dec_schedule: Optional[ThresholdSchedule] = None  # None: the decoder never exits
    kv_policy: str = "copy"
    policy: CosineExitPolicy = field(default_factory=CosineExitPolicy)
    trace: Optional[ExitTrace] = None
    dec_rule: Optional[DecoderExitRule] = None  # None: cosine with `policy`

    def __post_init__(self):
        if self.dec_rule is None:
            self.dec_rule = make_decoder_rule("cosine", cosine=self.policy)
        self.img_thres = validate_threshold(self.img_thres, "--img-thres")
        self.txt_thres = validate_threshold(self.txt_thres, "--txt-thres")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"--kv-policy must be one of {KV_POLICIES}, got {self.kv_policy!r}")

    @property
    def joint_thres(self) -> float:
        """Joint (non-decomposed) encoder: one exit for both modalities; it exits only where both
        streams' thresholds would allow it (the larger threshold)."""
        return max(self.img_thres, self.txt_thres)

    def dec_threshold(self, step: int) -> float:
        return 1.0 if self.dec_schedule is None else float(self.dec_schedule(step))
