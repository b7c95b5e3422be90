"""The errors a user can fix: bad data, a bad option value, a checkpoint that does not fit.

They reach the user of `fairseq-train`, `fairseq-generate` and `python -m mue...` as one line (no
traceback; `MUE_DEBUG=1` brings it back, see mue.compat). Anything else is a bug and keeps its
traceback. `user_message` finds our error also where torch re-raises it from another process.
"""
import re
import sys
from typing import Optional


class UserError(Exception):
    """Something the user gave us is wrong; the message says what, where, and what to do."""


class OptionError(UserError, ValueError):
    """An option value is out of range or of the wrong kind; the message names the option."""


# The header line of an exception in a formatted traceback: "package.module.Class: message" (or the
# bare class name) at the start of a line; frames and "Traceback (...)" lines never match.
_HEADER = re.compile(r"^([A-Za-z_][\w.]*)(?=: |$)", re.M)


def _exception_class(name: str):
    """The exception class a traceback names ("mue.data.readers.DataError", "ValueError"), if loaded."""
    module, _, qualname = name.rpartition(".")
    obj = getattr(sys.modules.get(module or "builtins"), qualname, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _final_error(traceback_text: str):
    """(class, message) of the last exception in a formatted traceback; (None, None) if none is named.

    The last header naming a loaded exception class wins: that is the exception that ended the
    process (chained ones come before it), and message lines that look like headers name no class.
    """
    for match in reversed(list(_HEADER.finditer(traceback_text))):
        cls = _exception_class(match.group(1))
        if cls is not None:
            return cls, traceback_text[match.end():].lstrip(":").strip()
    return None, None


def user_message(exc: BaseException) -> Optional[str]:
    """The message to show instead of a traceback if `exc` is a UserError, else None.

    Also unwraps the two ways torch hands on an error from another process with the original
    traceback inside the message: a DataLoader worker's error is re-raised as the same class with
    "Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...", and
    torch.multiprocessing.spawn (fairseq's multi-GPU workers) raises ProcessRaisedException whose
    message ends with the child's traceback. Only the original message is returned. And a bare
    `Exception` raised while handling a UserError (fairseq's Trainer.load_checkpoint turns any error
    of load_state_dict into "Cannot load model parameters from checkpoint FILE; ...") gives both
    messages, the wrapper's first: it names the file.
    """
    context = exc.__cause__ or exc.__context__
    if type(exc) is Exception and isinstance(context, UserError) and user_message(context):
        return f"{exc}\n{user_message(context)}"
    text = str(exc)
    worker = text.startswith("Caught ") and "\nOriginal Traceback" in text  # DataLoader's re-raise
    if isinstance(exc, UserError) and not worker:
        return text
    spawn = sys.modules.get("torch.multiprocessing.spawn")
    if isinstance(exc, UserError) or (spawn is not None and isinstance(exc, spawn.ProcessRaisedException)):
        cls, message = _final_error(text)
        if cls is not None and issubclass(cls, UserError):
            return message
    return None
