"""What a model needs at inference to exit early, in one object the task/generator attaches to it.

Training never sets it (every layer runs). Thresholds >= 1 mean "never exit" and reproduce the
full model exactly.
"""
from dataclasses import dataclass, field
from typing import Optional

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

    def __post_init__(self):
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
