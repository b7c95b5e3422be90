"""Exit-aware generation for fairseq-generate and the tasks' evaluation."""
from .generator import MueSequenceGenerator  # noqa: F401
