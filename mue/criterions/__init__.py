"""Training criteria; importing this package registers them with fairseq (`--criterion mue`, `mue_scst`,
`mue_imitation`)."""
from . import imitation, mue, scst  # noqa: F401  (registers "mue_imitation", "mue" and "mue_scst")
