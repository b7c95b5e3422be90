"""Early-exit machinery shared by encoder, decoder and generator: the cosine exit
policy, the decoder threshold schedule, exit statistics (Eq. 14) and FLOP counts."""
from . import flops
from .policy import NEVER_EXIT, CosineExitPolicy, validate_threshold
from .schedule import SCHEDULE_KINDS, ThresholdSchedule
from .stats import ENCODER_AVERAGES, FLOP_COMPONENTS, ExitStats, expected_time_reduction

#: the contract's name for the (only) policy
ExitPolicy = CosineExitPolicy

__all__ = [
    "CosineExitPolicy",
    "ExitPolicy",
    "NEVER_EXIT",
    "validate_threshold",
    "ThresholdSchedule",
    "SCHEDULE_KINDS",
    "ExitStats",
    "FLOP_COMPONENTS",
    "ENCODER_AVERAGES",
    "expected_time_reduction",
    "flops",
]
