"""Analytic FLOP counts for an OFA-style encoder-decoder, from its dimensions.

Convention: one multiply-add = 2 FLOPs.  Only matrix products and convolutions
are counted; biases, LayerNorm, softmax, activations, residual adds, pooling,
dropout and the (small, computed once) position-bias projections are ignored.
This keeps the counts simple, honest and comparable between the full model and
an early-exited one: every ignored term is either tiny or shared by both.

The numbers are per image / per sequence / per token as each function says;
ExitStats adds them up as "spent" (what ran) against "full" (no exits).
"""
from typing import Sequence, Tuple, Union

__all__ = [
    "conv_out_size",
    "resnet_stem_grid",
    "resnet_stem_flops",
    "encoder_layer_flops",
    "decoder_layer_flops_step",
    "cross_kv_flops",
    "output_projection_flops",
    "kv_fill_flops",
    "imitation_head_flops",
]


def _positive_int(value, name, fn):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"flops.{fn}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _non_negative_int(value, name, fn):
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"flops.{fn}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution/pooling along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def _hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        h, w = image_size
    else:
        h = w = image_size
    return (_positive_int(h, "image height", "resnet_stem_flops"),
            _positive_int(w, "image width", "resnet_stem_flops"))


def _stem_walk(image_size, blocks, width, expansion):
    """Yield (macs, h, w, channels) after each conv of the truncated ResNet."""
    h, w = _hw(image_size)
    # conv1: 7x7 stride 2 padding 3, 3 -> width channels
    h, w = conv_out_size(h, 7, 2, 3), conv_out_size(w, 7, 2, 3)
    macs = h * w * width * 3 * 7 * 7
    # maxpool 3x3 stride 2 padding 1 (no FLOPs counted)
    h, w = conv_out_size(h, 3, 2, 1), conv_out_size(w, 3, 2, 1)
    channels = width
    for stage, n_blocks in enumerate(blocks):
        planes = width * 2 ** stage
        out = planes * expansion
        stride = 1 if stage == 0 else 2
        for block in range(n_blocks):
            s = stride if block == 0 else 1
            ho, wo = conv_out_size(h, 3, s, 1), conv_out_size(w, 3, s, 1)
            macs += h * w * channels * planes          # 1x1 reduce, input resolution
            macs += ho * wo * planes * planes * 9      # 3x3, carries the stride (V1.5)
            macs += ho * wo * planes * out             # 1x1 expand
            if block == 0:                             # 1x1 (strided) downsample shortcut
                macs += ho * wo * channels * out
            h, w, channels = ho, wo, out
    return macs, h, w, channels


def resnet_stem_grid(image_size: Union[int, Tuple[int, int]], n_stages: int = 3) -> Tuple[int, int]:
    """Spatial size (h, w) of the stem's output grid (480 -> 30 x 30 for 3 stages)."""
    _, h, w, _ = _stem_walk(image_size, (1,) * n_stages, 64, 4)
    return h, w


def resnet_stem_flops(
    image_size: Union[int, Tuple[int, int]],
    d_model: int = 0,
    blocks: Sequence[int] = (3, 4, 23),
    width: int = 64,
    expansion: int = 4,
) -> int:
    """FLOPs of OFA's image stem for one image: truncated bottleneck ResNet + image_proj.

    torchvision-style ResNet V1.5 (stride on the 3x3 conv): conv1 7x7/2, maxpool
    3x3/2, then ``len(blocks)`` stages of bottleneck blocks (1x1, 3x3, 1x1, expansion
    ``expansion``; the first block of each stage has a 1x1 downsample shortcut).
    Defaults: ResNet-101's first three stages (3, 4, 23), 1024 output channels.
    Convolutions only (BatchNorm, ReLU, pooling ignored).  With ``d_model > 0`` adds
    ``image_proj`` (Linear channels -> d_model on every patch).
    """
    blocks = tuple(_positive_int(b, "blocks entry", "resnet_stem_flops") for b in blocks)
    width = _positive_int(width, "width", "resnet_stem_flops")
    expansion = _positive_int(expansion, "expansion", "resnet_stem_flops")
    d_model = _non_negative_int(d_model, "d_model", "resnet_stem_flops")
    macs, h, w, channels = _stem_walk(image_size, blocks, width, expansion)
    macs += h * w * channels * d_model
    return 2 * macs


def encoder_layer_flops(n_tokens: int, n_keys: int, d: int, ffn: int) -> int:
    """FLOPs of one pre-LN transformer encoder layer over ``n_tokens`` queries.

    q and out projections over the queries, k and v over ``n_keys`` keys (equal to
    ``n_tokens`` for self-attention over one stream), attention scores and the
    weighted sum (``n_tokens * n_keys * d`` each), FFN (d -> ffn -> d).
    Decomposed encoder: call once per stream, ``n_tokens = n_keys`` = that stream's
    tokens; joint encoder: both = image + text tokens.
    """
    n = _non_negative_int(n_tokens, "n_tokens", "encoder_layer_flops")
    k = _non_negative_int(n_keys, "n_keys", "encoder_layer_flops")
    d = _positive_int(d, "d", "encoder_layer_flops")
    ffn = _positive_int(ffn, "ffn", "encoder_layer_flops")
    macs = 2 * n * d * d + 2 * k * d * d + 2 * n * k * d + 2 * n * d * ffn
    return 2 * macs


def decoder_layer_flops_step(d: int, ffn: int, n_past: int, n_src: int) -> int:
    """FLOPs of one decoder layer for one generated/scored token (incremental state).

    Self-attention: q, k, v, out projections of the new token, attention over
    ``n_past`` keys (the cached ones *plus* the current token).  Cross-attention:
    q and out projections, attention over ``n_src`` encoder tokens (its k/v are
    ``cross_kv_flops``, paid once per sequence).  FFN.
    """
    d = _positive_int(d, "d", "decoder_layer_flops_step")
    ffn = _positive_int(ffn, "ffn", "decoder_layer_flops_step")
    n_past = _non_negative_int(n_past, "n_past", "decoder_layer_flops_step")
    n_src = _non_negative_int(n_src, "n_src", "decoder_layer_flops_step")
    macs = 4 * d * d + 2 * n_past * d + 2 * d * d + 2 * n_src * d + 2 * d * ffn
    return 2 * macs


def cross_kv_flops(n_src: int, d: int) -> int:
    """FLOPs of one decoder layer's cross-attention k and v over the encoder output
    (computed once per sequence and cached)."""
    n_src = _non_negative_int(n_src, "n_src", "cross_kv_flops")
    d = _positive_int(d, "d", "cross_kv_flops")
    return 2 * 2 * n_src * d * d


def output_projection_flops(d: int, vocab: int) -> int:
    """FLOPs of the (tied) output projection for one token."""
    d = _positive_int(d, "d", "output_projection_flops")
    vocab = _positive_int(vocab, "vocab", "output_projection_flops")
    return 2 * d * vocab


def kv_fill_flops(d: int) -> int:
    """FLOPs to fill one skipped layer's self-attention k/v for one token under the
    ``copy`` KV policy: the k and v linear maps of the exit state (LayerNorm ignored)."""
    d = _positive_int(d, "d", "kv_fill_flops")
    return 2 * 2 * d * d


def imitation_head_flops(d: int, hidden: int) -> int:
    """FLOPs of one imitation head (d -> hidden -> d MLP, mue.exiting.baselines) for one token."""
    d = _positive_int(d, "d", "imitation_head_flops")
    hidden = _positive_int(hidden, "hidden", "imitation_head_flops")
    return 2 * 2 * d * hidden
