"""Strict, explained state-dict checking for `mue_ofa` (official OFA checkpoints included).

Derived buffers (relative-position bucket tables, version counters, OFA's image-code position ids)
are recomputed by the model, so they are dropped from incoming state dicts instead of trusted.

Optional modules (``OPTIONAL_PREFIXES``: the imitation heads ``decoder.exit_heads.*`` that only
``--exit-policy imitation`` adds) are checked like everything else when both the model and the
checkpoint hold them. The one exception: a model that has them may load a checkpoint that has none of
them (an OFA or MuE backbone, before the heads are trained); the heads then keep their initial values
and a warning says so. A checkpoint holding them for a model without them is still rejected
(unexpected keys), as is a checkpoint holding only some of them (missing keys).
"""
import logging
import re

from mue.errors import UserError

logger = logging.getLogger(__name__)

DERIVED = re.compile(r"(^|\.)(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")
OPTIONAL_PREFIXES = ("decoder.exit_heads.",)


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint does not fit the model; the message lists every offending name (several lines)."""


def check_and_clean_state_dict(model, state_dict, strict=True):
    """Return `state_dict` without derived buffers; with `strict`, raise one error listing all
    missing, unexpected and mis-shaped names instead of letting anything be filled at random."""
    cleaned = {k: v for k, v in state_dict.items() if not DERIVED.search(k)}
    if not strict:
        return cleaned
    expected = model.state_dict()
    for prefix in OPTIONAL_PREFIXES:
        mine = [k for k in expected if k.startswith(prefix)]
        if mine and not any(k.startswith(prefix) for k in cleaned):
            logger.warning("the checkpoint has no %s* parameters: they keep their initial values", prefix)
            cleaned.update({k: expected[k] for k in mine})
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(cleaned[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(cleaned)
        if tuple(cleaned[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = ["the checkpoint does not fit the model (nothing was loaded):"]
        for title, names in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                             ("shape mismatch", misshaped)):
            if names:
                shown = names[:20] + ([f"... and {len(names) - 20} more"] if len(names) > 20 else [])
                lines.append(f"  {title} ({len(names)}): " + ", ".join(shown))
        if any(k.startswith(OPTIONAL_PREFIXES) for k in unexpected):
            lines.append("  hint: the checkpoint has imitation heads (decoder.exit_heads); evaluate it with "
                         "--exit-policy imitation")
        vocab = [m for m in misshaped if "embed_tokens" in m or "output_projection" in m]
        if vocab:
            lines.append("  hint: the vocabulary size differs; build the task on the dictionary the checkpoint was "
                         "trained with (OFA: dict.txt + <mask> + 8192 codes + 1000 bins = 59,457)")
        raise CheckpointMismatchError("\n".join(lines))
    return cleaned
