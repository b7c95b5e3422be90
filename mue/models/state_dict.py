"""Strict, explained state-dict checking for `mue_ofa` (official OFA checkpoints included).

Derived buffers (relative-position bucket tables, version counters, OFA's image-code position ids)
are recomputed by the model, so they are dropped from incoming state dicts instead of trusted.
"""
import re

DERIVED = re.compile(r"(^|\.)(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending name."""


def check_and_clean_state_dict(model, state_dict, strict=True):
    """Return `state_dict` without derived buffers; with `strict`, raise one error listing all
    missing, unexpected and mis-shaped names instead of letting anything be filled at random."""
    cleaned = {k: v for k, v in state_dict.items() if not DERIVED.search(k)}
    if not strict:
        return cleaned
    expected = model.state_dict()
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
        vocab = [m for m in misshaped if "embed_tokens" in m or "output_projection" in m]
        if vocab:
            lines.append("  hint: the vocabulary size differs; build the task on the dictionary the checkpoint was "
                         "trained with (OFA: dict.txt + <mask> + 8192 codes + 1000 bins = 59,457)")
        raise CheckpointMismatchError("\n".join(lines))
    return cleaned
