"""Loading and converting official OFA checkpoints."""
from .ofa import infer_arch, load_ofa_state_dict, load_into_arch  # noqa: F401
