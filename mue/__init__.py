"""mue: MuE multiple exiting for OFA-style vision-language models, as a fairseq plugin.

Importing the package (fairseq's `--user-dir mue`, or `import mue`) applies the documented
compatibility patches once and registers the model, tasks and criteria with fairseq.
"""
from . import compat

compat.apply()

from . import criterions, models, tasks  # noqa: E402,F401  (registration)


def __getattr__(name):
    """``mue.load(checkpoint, ...)``: the Python API (mue.api), imported on first use."""
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'mue' has no attribute {name!r}")
