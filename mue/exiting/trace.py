"""A raw record of what an exiting model actually ran, written by the encoder and decoder and read
by ExitStats (layers, Eq. 14, FLOPs). Kept raw so accounting lives in one place.

Tensors stay where the model made them: reading them on the host during generation would cost a
device sync per step; mue.exiting.accounting moves them all in one transfer afterwards."""
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class EncoderRecord:
    image_depths: torch.Tensor  # [B] layers run by each row's image stream (0: no image)
    text_depths: torch.Tensor  # [B] layers run by each row's text stream
    image_tokens: torch.Tensor  # [B] real image tokens per row
    text_tokens: torch.Tensor  # [B] real text tokens per row
    joint: bool  # one stream over [image; text] (depths equal)
    image_hw: tuple  # (H, W) pixels of the input images, () without images
    encoded: Optional[torch.Tensor] = None  # [B] rows whose image stream ran (others reused it); None: all


@dataclass
class DecoderStepRecord:
    depths: torch.Tensor  # [B] layers this step's token used in each row (its exit layer: Eq. 14)
    n_past: int  # positions attended by self-attention (this one included)
    n_src: torch.Tensor  # [B] encoder positions attended by cross-attention
    kv_filled: int  # (row, layer) key/value entries computed for skipped layers
    exit_projections: int = 0  # (row, layer) vocabulary projections made to decide exits (entropy, patience, imitation)
    exit_head_calls: int = 0  # (row, layer) imitation-head applications made to decide exits
    ran: Optional[torch.Tensor] = None  # [B] layers computed for the row (FLOPs), when more than `depths`


@dataclass
class CrossKVRecord:
    n_src: torch.Tensor  # [N] encoder positions of each source
    layers: torch.Tensor  # [N] decoder layers whose cross-attention keys/values were computed for the source
    full: bool = True  # these sources count in the full model's cost (once per call: False for later additions)


@dataclass
class ExitTrace:
    encoder: List[EncoderRecord] = field(default_factory=list)
    decoder: List[DecoderStepRecord] = field(default_factory=list)
    cross_kv: List[CrossKVRecord] = field(default_factory=list)

    def clear(self):
        self.encoder.clear()
        self.decoder.clear()
        self.cross_kv.clear()

    def add_encoder(self, image_depths, text_depths, image_tokens, text_tokens, joint: bool, image_hw=(),
                    encoded=None):
        tensors = (t.detach() for t in (image_depths, text_depths, image_tokens, text_tokens))
        self.encoder.append(EncoderRecord(*tensors, joint, tuple(image_hw),
                                          None if encoded is None else encoded.detach()))

    def add_cross_kv(self, n_src, layers, full: bool = True):
        self.cross_kv.append(CrossKVRecord(n_src.detach(), layers.detach(), bool(full)))

    def add_decoder_step(self, depths, n_past: int, n_src, kv_filled: int, exit_projections: int = 0,
                         exit_head_calls: int = 0, ran=None):
        self.decoder.append(DecoderStepRecord(depths.detach(), int(n_past), n_src.detach(), int(kv_filled),
                                              int(exit_projections), int(exit_head_calls),
                                              None if ran is None else ran.detach()))


def split_rows(trace: ExitTrace, encoder_owners, decoder_owners, cross_kv_owners, n_dec_layers: int,
               kv_weights=None) -> dict:
    """Split `trace` by owner (e.g. the example each row belongs to): {owner: ExitTrace of its rows only}.

    ``encoder_owners[k]``, ``decoder_owners[k]``, ``cross_kv_owners[k]``: the owner of each row (each
    source, for cross keys/values) of the k-th record of that kind, one int per row; so that
    `mue.exiting.accounting.account` on a part gives that owner's layers, Eq. 14 and FLOPs (the Python
    API reports them per example). The counts a decoder record keeps per step rather than per row are
    shared out: keys/values filled for skipped layers in proportion to ``kv_weights[k]`` (one weight per row
    of the k-th decoder record; default: the layers each row skipped, ``n_dec_layers - depth``, exact for a
    generation step under the default `copy` policy, where every exited row fills the layers it skipped),
    vocabulary projections and head calls of the baseline rules in proportion to the layers each row decided
    at (``min(depth, n_dec_layers - 1)``, exact but for the dense layout, which decides for every row at
    every layer). Shares are fractions, not ints.
    """
    kinds = (("encoder", trace.encoder, encoder_owners), ("decoder", trace.decoder, decoder_owners),
             ("cross_kv", trace.cross_kv, cross_kv_owners))
    for name, records, owners in kinds:
        if len(records) != len(owners):
            raise ValueError(f"split_rows: {len(owners)} owner lists for {len(records)} {name} records")
    parts: dict = {}

    def groups(owners, rows: int):
        owners = torch.as_tensor(owners, dtype=torch.long).reshape(-1).cpu()
        if owners.numel() != rows:
            raise ValueError(f"split_rows: {owners.numel()} owners for a record of {rows} rows")
        for owner in torch.unique(owners).tolist():
            yield parts.setdefault(owner, ExitTrace()), (owners == owner).nonzero().flatten()

    for rec, owners in zip(trace.encoder, encoder_owners):
        image_depths, text_depths, image_tokens, text_tokens = (t.cpu() for t in (
            rec.image_depths, rec.text_depths, rec.image_tokens, rec.text_tokens))
        encoded = None if rec.encoded is None else rec.encoded.cpu()
        for part, idx in groups(owners, image_depths.numel()):
            part.encoder.append(EncoderRecord(image_depths[idx], text_depths[idx], image_tokens[idx], text_tokens[idx],
                                              rec.joint, rec.image_hw, None if encoded is None else encoded[idx]))
    if kv_weights is not None and len(kv_weights) != len(trace.decoder):
        raise ValueError(f"split_rows: {len(kv_weights)} kv weight lists for {len(trace.decoder)} decoder records")
    for k, (rec, owners) in enumerate(zip(trace.decoder, decoder_owners)):
        depths, n_src = rec.depths.cpu(), rec.n_src.cpu()
        ran = None if rec.ran is None else rec.ran.cpu()
        skipped = ((n_dec_layers - depths).clamp(min=0) if kv_weights is None
                   else torch.as_tensor(kv_weights[k]).reshape(-1).cpu()).double()
        decided = depths.clamp(max=max(n_dec_layers - 1, 0)).double()
        for part, idx in groups(owners, depths.numel()):
            part.decoder.append(DecoderStepRecord(
                depths[idx], rec.n_past, n_src[idx], _share(rec.kv_filled, skipped, idx),
                _share(rec.exit_projections, decided, idx), _share(rec.exit_head_calls, decided, idx),
                None if ran is None else ran[idx]))
    for rec, owners in zip(trace.cross_kv, cross_kv_owners):
        n_src, layers = rec.n_src.cpu(), rec.layers.cpu()
        for part, idx in groups(owners, n_src.numel()):
            part.cross_kv.append(CrossKVRecord(n_src[idx], layers[idx], rec.full))
    return parts


def _share(count, weights: torch.Tensor, idx: torch.Tensor) -> float:
    """The part of a step's `count` that falls on rows `idx`, by `weights` (by row count if they are all 0)."""
    if not count:
        return 0
    total = float(weights.sum())
    if total == 0:
        return count * idx.numel() / weights.numel()
    return count * float(weights[idx].sum()) / total
