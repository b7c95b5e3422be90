"""Exit-aware generation for fairseq-generate and the tasks' evaluation."""
from .generator import MueSequenceGenerator, exit_settings_from_cfg  # noqa: F401
