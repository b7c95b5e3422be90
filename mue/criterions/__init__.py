"""Training criteria; importing this package registers them with fairseq (`--criterion mue`)."""
from . import mue  # noqa: F401  (registers "mue")
