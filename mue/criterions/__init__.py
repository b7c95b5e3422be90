"""Training criteria; importing this package registers them with fairseq (`--criterion mue`, `mue_scst`)."""
from . import mue, scst  # noqa: F401  (registers "mue" and "mue_scst")
