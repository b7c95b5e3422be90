"""Tasks; importing this package registers them with fairseq (`--task mue_snli_ve`, `--task mue_caption`)."""
from . import caption, snli_ve  # noqa: F401  (registration)
from .caption import CaptionConfig, CaptionTask  # noqa: F401
from .snli_ve import SnliVeConfig, SnliVeTask, score_candidates  # noqa: F401
from .vl_task import VisionLanguageConfig, VisionLanguageTask  # noqa: F401
