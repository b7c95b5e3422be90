"""What the Python API returns: one dataclass per answered example, with what its exits saved.

Plain data (ints, floats, strings, lists), so ``as_dict`` gives JSON-ready dicts for the command line's
``--json`` and the pictures of mue.visualize.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class ExampleExits:
    """Where one example stopped computing, and what that saved against the full model on the same input.

    ``token_layers``: the decoder layer each token of the returned output exited at (its last token is
    </s>), as the model computed it during the search. The other figures count everything the example ran:
    with beam search every beam row's tokens (as fairseq-generate's exit summary does), with SNLI-VE every
    answer candidate's tokens. ``expected_time_reduction`` is the paper's Eq. 14 for this example;
    ``flops``/``flops_full`` are what ran and what the full model would run (mue.exiting.accounting).
    An image shared by several examples of one batch is encoded once, and counted for the first of them.
    ``flops_by_component``: {component: {"spent", "full"}} (mue.exiting.stats.FLOP_COMPONENTS). One part
    of an example's cost depends on its batch mates: beam search computes a decoder layer's cross-attention
    keys/values for every example of the batch the first time any row reaches that layer ("cross_kv").
    ``seconds``: the wall-clock time of the example's batch divided by the examples in it (exact with batch
    size 1).
    """
    image_layers: Optional[int]  # image-stream depth (None: no image stream ran for this example)
    text_layers: int  # text-stream depth (the joint encoder's depth when the encoder is joint)
    encoder_layers: int  # N_E, layers of the full encoder (of the reference arch, if one was set)
    decoder_layers: int  # N_D
    token_layers: List[int]
    mean_decoder_layers: float  # over every decoder token the example ran
    expected_time_reduction: float
    flops: float
    flops_full: float
    flops_by_component: Dict[str, Dict[str, float]]
    seconds: float

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops / self.flops_full if self.flops_full else 0.0


@dataclass
class Caption:
    """A generated caption. ``text``: normalised as the caption task scores it; ``tokens``: each output
    token's text (" a", " red", ..., "</s>"), aligned with ``token_ids``, ``token_scores`` and
    ``exits.token_layers``; ``score``: fairseq's hypothesis score (the length-normalised log-probability
    in nats, which fairseq-generate prints divided by ln 2)."""
    source: str  # the file name, or "<image N>" / "<bytes N>" for in-memory inputs
    text: str
    tokens: List[str]
    token_ids: List[int]
    token_scores: List[float]
    score: float
    exits: ExampleExits

    def as_dict(self) -> dict:
        return _as_dict(self, "caption")


@dataclass
class Entailment:
    """A visual-entailment answer: does the image support the hypothesis? ``answer`` is "yes"
    (entailment), "no" (contradiction) or "maybe" (neutral), the candidate with the highest summed
    log-probability ``score`` (nats, </s> included), as the SNLI-VE task answers."""
    source: str
    hypothesis: str
    premise: Optional[str]
    answer: str
    label: str
    tokens: List[str]
    token_ids: List[int]
    token_scores: List[float]
    score: float
    exits: ExampleExits

    def as_dict(self) -> dict:
        return _as_dict(self, "entailment")


def _as_dict(result, kind: str) -> dict:
    out = {"kind": kind, **dataclasses.asdict(result)}
    out["exits"]["flops_reduction"] = result.exits.flops_reduction
    return out
