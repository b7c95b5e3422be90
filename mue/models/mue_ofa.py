"""The `mue_ofa` model: OFA's unified encoder-decoder, with MuE's decomposed encoder and exits.

Parameter names and shapes follow OFA's checkpoints (docs/OFA.md; the full list is tests/data/ofa_base_state_dict.tsv), so
an official OFA state dict loads with strict checking into the matching `mue_ofa_*` arch.
"""
import contextlib
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import FairseqEncoderDecoderModel, register_model, register_model_architecture
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from torch import nn

from .decoder import MueDecoder
from .encoder import ENCODER_MODES, MueEncoder
from .state_dict import check_and_clean_state_dict


@dataclass
class MueOFAConfig(FairseqDataclass):
    encoder_mode: ChoiceEnum(ENCODER_MODES) = field(
        default="decomposed",
        metadata={"help": "joint: one stack over [image; text] (vanilla OFA); decomposed: MuE's tied "
                          "image and text streams, each exiting at its own depth"},
    )
    encoder_embed_dim: int = field(default=768, metadata={"help": "model dimension"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "FFN hidden size"})
    encoder_layers: int = field(default=6, metadata={"help": "encoder layers"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "encoder heads"})
    decoder_embed_dim: int = field(default=768, metadata={"help": "must equal encoder_embed_dim"})
    decoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "decoder FFN hidden size"})
    decoder_layers: int = field(default=6, metadata={"help": "decoder layers"})
    decoder_attention_heads: int = field(default=12, metadata={"help": "decoder heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    encoder_drop_path_rate: float = field(default=0.0, metadata={"help": "drop-path rate of the last encoder layer (linear from 0)"})
    decoder_drop_path_rate: float = field(default=0.0, metadata={"help": "drop-path rate of the last decoder layer (linear from 0)"})
    resnet_blocks: str = field(default="3,4,23", metadata={"help": "bottleneck blocks in ResNet stages 1-3 (ResNet-101: 3,4,23)"})
    token_bucket_size: int = field(default=256, metadata={"help": "1D relative-position buckets (2n-1 rows)"})
    image_bucket_size: int = field(default=42, metadata={"help": "2D image position grid side"})
    attn_scale_factor: float = field(default=2.0, metadata={"help": "attention scale (head_dim * f) ** -0.5"})
    max_source_positions: int = field(default=1024, metadata={"help": "max text tokens in the encoder"})
    max_target_positions: int = field(default=1024, metadata={"help": "max target tokens"})
    freeze_embeddings: bool = field(default=False, metadata={"help": "freeze the shared token embedding (caption stage 1)"})


#: Parameters of OFA's image-generation path (decoding image codes), kept so that OFA checkpoints load
#: strictly and are saved again, but used by no mue task: they get requires_grad=False, so that fairseq's
#: optimizer leaves them out and DistributedDataParallel does not wait for their gradients (plain DDP
#: works without --find-unused-parameters, which costs a graph traversal per step).
UNUSED_PARAMETERS = ("decoder.embed_image_positions.", "decoder.image_pos_ln.", "decoder.code_layernorm_embedding.",
                     "decoder.image_rel_pos_table_list.")


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Set every BatchNorm running mean and variance in `module` to its mean over the data-parallel ranks.

    Training normalises with each batch's own statistics (as OFA fine-tunes: plain BatchNorm, no
    --freeze-resnet, no --sync-bn), and each process updates the running statistics from its own batches,
    so without this the ranks drift apart and the checkpoint holds rank 0's. The running statistics are
    moving averages, linear in the batch statistics, so averaging them after every training forward gives
    every rank, and the checkpoint, the moving average of the ranks' mean batch statistics. Gradients and
    the training forward are unchanged. One all-reduce per training forward (ResNet-101's stages 1-3:
    83k numbers, 0.3 MB in fp32); nothing in a single process. Called in training mode only, where every
    rank runs the same number of forwards (fairseq pads a short shard with dummy batches)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from fairseq.distributed import utils as distributed_utils

    group = distributed_utils.get_data_parallel_group()
    world = distributed_utils.get_world_size(group)
    slots = [(m, name) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats for name in ("running_mean", "running_var")]
    if world < 2 or not slots:
        return
    stats = [getattr(m, name) for m, name in slots]
    flat = torch.cat([s.reshape(-1) for s in stats])
    torch.distributed.all_reduce(flat, group=group)
    flat.div_(world)
    # new tensors, not in-place: the forward's autograd graph holds the old ones (BatchNorm's backward
    # checks that its inputs were not modified)
    for (m, name), old, part in zip(slots, stats, flat.split([s.numel() for s in stats])):
        setattr(m, name, part.view_as(old).clone())


@register_model("mue_ofa", dataclass=MueOFAConfig)
class MueOFAModel(FairseqEncoderDecoderModel):
    @classmethod
    def build_model(cls, cfg, task):
        dictionary = task.source_dictionary
        if task.target_dictionary is not None and len(task.target_dictionary) != len(dictionary):
            raise ValueError("mue_ofa shares one vocabulary between encoder and decoder; the task's source "
                             f"and target dictionaries differ ({len(dictionary)} vs {len(task.target_dictionary)})")
        if cfg.encoder_embed_dim != cfg.decoder_embed_dim:
            raise ValueError("mue_ofa ties its embeddings: --encoder-embed-dim must equal --decoder-embed-dim")
        embed_tokens = nn.Embedding(len(dictionary), cfg.encoder_embed_dim, padding_idx=dictionary.pad())
        model = cls(MueEncoder(cfg, dictionary, embed_tokens), MueDecoder(cfg, dictionary, embed_tokens))
        for module in model.modules():
            init_bert_params(module)
        if cfg.freeze_embeddings:
            embed_tokens.weight.requires_grad_(False)
        for name, param in model.named_parameters():
            if name.startswith(UNUSED_PARAMETERS):
                param.requires_grad_(False)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, patch_images=None, patch_masks=None,
                return_all_hiddens: bool = False, features_only: bool = False, encoder_rows=None, **kwargs):
        """``encoder_rows`` [R] (optional): the decoder's row r reads source ``encoder_rows[r]``, so the
        encoder runs once per source instead of once per decoder row (self-critical training scores k
        captions of each image); the sources' keys/values are shared as in beam search."""
        encoder_out = self.encoder(src_tokens, src_lengths, patch_images, patch_masks, return_all_hiddens=return_all_hiddens)
        if self.training:
            average_batchnorm_statistics(self.encoder)
        if encoder_rows is not None:
            encoder_out = self.encoder.reorder_encoder_out(encoder_out, encoder_rows)
        return self.decoder(prev_output_tokens, encoder_out=encoder_out, features_only=features_only,
                            return_all_hiddens=return_all_hiddens)

    @contextlib.contextmanager
    def exiting(self, settings):
        """Within the block, forward passes exit early under `settings` (mue.exiting.ExitSettings); the
        previous settings (none, outside a session) come back afterwards, even on error. Callers use
        mue.exiting.session.exit_session, which builds the settings and a fresh trace."""
        previous = self.encoder.exit_settings, self.decoder.exit_settings
        self.encoder.exit_settings = self.decoder.exit_settings = settings
        try:
            yield settings
        finally:
            self.encoder.exit_settings, self.decoder.exit_settings = previous

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Strict by default: one clear error lists every missing, unexpected or mis-shaped parameter."""
        state_dict = check_and_clean_state_dict(self, state_dict, strict=strict)
        return nn.Module.load_state_dict(self, state_dict, strict=strict)


def _arch(name, **defaults):
    """Register an architecture that fills in the given sizes unless the user set them."""

    def fill(args):
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)

    register_model_architecture("mue_ofa", name)(fill)
    return fill


def _sizes(dim, layers, heads, ffn, resnet, **extra):
    return dict(encoder_embed_dim=dim, decoder_embed_dim=dim, encoder_layers=layers, decoder_layers=layers,
                encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_embed_dim=ffn,
                decoder_ffn_embed_dim=ffn, resnet_blocks=resnet, **extra)


ARCHS = {
    # CPU work: OFA-base's depth (6+6, so exit fractions compare), small width, one block per ResNet stage
    "mue_ofa_micro": _sizes(128, 6, 4, 512, "1,1,1", max_source_positions=256, max_target_positions=256),
    "mue_ofa_nano": _sizes(96, 3, 4, 384, "1,1,1", max_source_positions=256, max_target_positions=256),  # OFA-Tiny baseline of micro
    "mue_ofa_tiny": _sizes(256, 4, 4, 1024, "3,4,6"),
    "mue_ofa_medium": _sizes(512, 4, 8, 2048, "3,4,23"),
    "mue_ofa_base": _sizes(768, 6, 12, 3072, "3,4,23"),
    "mue_ofa_large": _sizes(1024, 12, 16, 4096, "3,8,36"),
}
ARCH_FILLERS = {name: _arch(name, **sizes) for name, sizes in ARCHS.items()}
