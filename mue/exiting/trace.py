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
