"""Decoder exit rules: MuE's cosine rule and the baselines it is compared with, behind one hook.

The decoder asks its rule, after each of layers 1..L-1, which rows stop (``decide``); a rule may also
replace a stopping row's state (the imitation rule does). Rows are ``[N, 1, C]`` states: the active
rows of one generation step, or every (row, position) pair of a teacher-forced call, so the cached
and the parallel decoder take the same decisions from the same states.

Rules (``--exit-policy``; encoder streams always use cosine with --img-thres/--txt-thres):
  * ``cosine`` (MuE): stop when cos(h_i, h_{i-1}) > threshold (``--dec-thres`` and its schedule).
  * ``entropy`` (DeeBERT-style): stop when the entropy, in nats, of the layer's own prediction
    ``softmax(decoder.project(h_i))`` is below ``--exit-entropy`` (0: never; entropies are >= 0).
  * ``patience`` (PABEE-style): stop after layer i when the argmax of ``decoder.project`` has stayed
    the same for ``--exit-patience`` consecutive layers, i.e. layers i-P..i all predict the same token
    (earliest exit: layer P+1; 0: never). The count lives per row and follows the active rows.
  * ``imitation`` (DeeCap-style): a small network per layer predicts the last layer's state from
    layer i's (``ImitationHeads``, trained with the backbone frozen by criterion ``mue_imitation``);
    stop when the entropy of the prediction made from the imitated deep state is below
    ``--exit-entropy`` (DeeCap's entropy-based exit), and the row continues from the imitated state,
    so its output (and the keys/values later layers read under ``--kv-policy copy``) come from it.
    DeeCap fuses shallow and imitated states with a learned gate; here the imitated state is used
    directly (a simplification, stated so results are read accordingly).

The entropy, patience and imitation rules project every decided row onto the vocabulary (and the
imitation rule runs its network first): that cost is real and is counted (``exit_classifier`` FLOPs).
The schedules (--dec-schedule) shape the cosine threshold only.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EXIT_POLICIES, never_exits, validate_choice, validate_exit_entropy, validate_exit_patience
from .policy import CosineExitPolicy

__all__ = ["EXIT_POLICIES", "DecoderExitRule", "CosineDecoderExit", "EntropyDecoderExit",
           "PatienceDecoderExit", "ImitationDecoderExit", "ImitationHeads", "make_decoder_rule",
           "prediction_entropy", "validate_exit_entropy", "validate_exit_patience", "attach_imitation_heads",
           "DepthLimit"]

def prediction_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last axis (fp32 softmax)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class DecoderExitRule:
    """The hook the decoder calls. Subclasses set ``name``, ``projects`` (a decision projects onto the
    vocabulary) and ``uses_heads`` (a decision runs an imitation head), and implement ``decide``."""

    name = "base"
    projects = False
    uses_heads = False

    def enabled(self, threshold) -> bool:
        """Whether any exit can happen (``threshold``: the cosine threshold, float or tensor)."""
        raise NotImplementedError

    def new_state(self, n_rows: int, device) -> Optional[dict]:
        """Per-row state carried across the layers of one call (None: stateless)."""
        return None

    def decide(self, idx: int, out: Tensor, inputs: Tensor, threshold, decoder, state: Optional[dict],
               rows: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """After layer ``idx`` (0-based): ``(stop BoolTensor[N], out)`` for ``out`` [N, 1, C] (the layer's
        outputs) and ``inputs`` [N, 1, C] (its inputs). ``rows``: which state rows these are (None: all).
        The returned ``out`` is the given tensor itself unless the rule replaces stopping rows' states."""
        raise NotImplementedError

    def exit_state(self, idx: int, out: Tensor, decoder) -> Tensor:
        """The state a row continues from when it exits after layer ``idx`` (default: its own)."""
        return out


class CosineDecoderExit(DecoderExitRule):
    """MuE: stop when cos(layer output, layer input) > threshold (per row; threshold >= 1 never)."""

    name = "cosine"

    def __init__(self, policy: Optional[CosineExitPolicy] = None):
        self.policy = policy if policy is not None else CosineExitPolicy()

    def enabled(self, threshold) -> bool:
        if isinstance(threshold, Tensor):
            return not bool(never_exits(threshold.min()))
        return not never_exits(threshold)

    def decide(self, idx, out, inputs, threshold, decoder, state, rows):
        return self.policy.should_exit(self.policy.similarity(out, inputs), threshold), out

    def __repr__(self):
        return f"CosineDecoderExit({self.policy!r})"


class EntropyDecoderExit(DecoderExitRule):
    """DeeBERT-style: stop when the entropy (nats) of the layer's prediction is below ``max_entropy``."""

    name = "entropy"
    projects = True

    def __init__(self, max_entropy: float):
        self.max_entropy = validate_exit_entropy(max_entropy)

    def enabled(self, threshold) -> bool:
        return self.max_entropy > 0

    def decide(self, idx, out, inputs, threshold, decoder, state, rows):
        return prediction_entropy(decoder.project(out)).mean(1) < self.max_entropy, out

    def __repr__(self):
        return f"EntropyDecoderExit(max_entropy={self.max_entropy:g})"


class PatienceDecoderExit(DecoderExitRule):
    """PABEE-style: stop once the argmax prediction has stayed unchanged for ``patience`` layers."""

    name = "patience"
    projects = True

    def __init__(self, patience: int):
        self.patience = validate_exit_patience(patience)

    def enabled(self, threshold) -> bool:
        return self.patience > 0

    def new_state(self, n_rows, device):
        return {"prev": torch.full((n_rows,), -1, dtype=torch.long, device=device),
                "count": torch.zeros(n_rows, dtype=torch.long, device=device)}

    def decide(self, idx, out, inputs, threshold, decoder, state, rows):
        pred = decoder.project(out)[:, -1].argmax(-1)
        where = slice(None) if rows is None else rows
        count = torch.where(pred == state["prev"][where], state["count"][where] + 1, 0)
        state["prev"][where], state["count"][where] = pred, count
        return count >= self.patience, out

    def __repr__(self):
        return f"PatienceDecoderExit(patience={self.patience})"


class ImitationDecoderExit(DecoderExitRule):
    """DeeCap-style: imitate the last layer's state; stop when the imitated prediction's entropy is below
    ``max_entropy``; a stopping row continues from the imitated state."""

    name = "imitation"
    projects = True
    uses_heads = True

    def __init__(self, max_entropy: float):
        self.max_entropy = validate_exit_entropy(max_entropy)

    def enabled(self, threshold) -> bool:
        return self.max_entropy > 0

    @staticmethod
    def heads(decoder) -> "ImitationHeads":
        heads = getattr(decoder, "exit_heads", None)
        if heads is None:
            raise ValueError("--exit-policy imitation needs the model's imitation heads (decoder.exit_heads): "
                             "build the model through a mue task with --exit-policy imitation")
        return heads

    def exit_state(self, idx, out, decoder):
        return self.heads(decoder)(idx, out)

    def decide(self, idx, out, inputs, threshold, decoder, state, rows):
        deep = self.exit_state(idx, out, decoder)
        stop = prediction_entropy(decoder.project(deep)).mean(1) < self.max_entropy
        return stop, torch.where(stop[:, None, None], deep, out)

    def __repr__(self):
        return f"ImitationDecoderExit(max_entropy={self.max_entropy:g})"


class DepthLimit(DecoderExitRule):
    """``--exit-depth``: ``inner``'s decisions, and every row stops after layer ``depth`` at the latest."""

    def __init__(self, inner: DecoderExitRule, depth: int):
        if depth < 1:
            raise ValueError(f"DepthLimit: depth must be >= 1, got {depth}")
        self.inner, self.depth = inner, int(depth)
        self.name, self.projects, self.uses_heads = inner.name, inner.projects, inner.uses_heads

    def enabled(self, threshold) -> bool:
        return True

    def new_state(self, n_rows: int, device):
        return self.inner.new_state(n_rows, device)

    def decide(self, idx, out, inputs, threshold, decoder, state, rows):
        if self.inner.enabled(threshold):
            stop, out = self.inner.decide(idx, out, inputs, threshold, decoder, state, rows)
        else:
            stop = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
        return stop | (idx + 1 >= self.depth), out

    def exit_state(self, idx, out, decoder):
        return self.inner.exit_state(idx, out, decoder)

    def __repr__(self):
        return f"DepthLimit({self.inner!r}, depth={self.depth})"


def make_decoder_rule(exit_policy: str = "cosine", exit_entropy: float = 0.0, exit_patience: int = 0,
                      cosine: Optional[CosineExitPolicy] = None) -> DecoderExitRule:
    """The decoder rule of ``--exit-policy`` with its knob (the knobs are checked by
    mue.exiting.config.check: a knob given to the wrong rule is an error there)."""
    exit_policy = validate_choice(exit_policy, "--exit-policy", EXIT_POLICIES)
    entropy, patience = validate_exit_entropy(exit_entropy), validate_exit_patience(exit_patience)
    if exit_policy == "cosine":
        return CosineDecoderExit(cosine)
    if exit_policy == "entropy":
        return EntropyDecoderExit(entropy)
    if exit_policy == "patience":
        return PatienceDecoderExit(patience)
    return ImitationDecoderExit(entropy)


class ImitationHeads(nn.Module):
    """One residual 2-layer MLP per decoder layer 1..L-1: ``g_i(h) = h + W2 gelu(W1 LN(h))`` predicts the
    last layer's state (before the final LayerNorm) from layer i's. ``W2`` starts at zero, so an
    untrained head is the identity (the row keeps its own state)."""

    def __init__(self, dim: int, n_layers: int, hidden: int = 0):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"ImitationHeads: the decoder needs >= 2 layers, got {n_layers}")
        hidden = int(hidden) or dim
        self.dim, self.hidden = dim, hidden
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layers - 1))
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(n_layers - 1))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(n_layers - 1))
        for fc in self.fc2:
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)

    def __len__(self):
        return len(self.fc1)

    def forward(self, idx: int, states: Tensor) -> Tensor:
        """Predicted last-layer state from the output of layer ``idx + 1`` (0-based ``idx`` < L-1)."""
        if not 0 <= idx < len(self):
            raise ValueError(f"ImitationHeads: no head after decoder layer {idx + 1} (heads for layers 1..{len(self)})")
        return states + self.fc2[idx](F.gelu(self.fc1[idx](self.norms[idx](states))))


def attach_imitation_heads(model, hidden: int = 0) -> ImitationHeads:
    """Give a mue_ofa model its imitation heads as ``model.decoder.exit_heads`` (state-dict keys
    ``decoder.exit_heads.*``, optional in checkpoints: see mue.models.state_dict)."""
    decoder = model.decoder
    heads = ImitationHeads(decoder.layer_norm.normalized_shape[0], len(decoder.layers), hidden)
    ref = decoder.layer_norm.weight
    decoder.exit_heads = heads.to(device=ref.device, dtype=ref.dtype)
    return decoder.exit_heads
