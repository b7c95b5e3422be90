"""Turns an ExitTrace (what a model ran) into ExitStats (layers, Eq. 14, FLOPs by component).

Every count uses the real (non-padding) tokens of each row and the model's own sizes; the full
model's cost is counted on the same inputs, so spent/full is the FLOP-predicted speedup.
"""
from .flops import (cross_kv_flops, decoder_layer_flops_step, encoder_layer_flops, kv_fill_flops,
                    output_projection_flops, resnet_stem_flops)
from .stats import ExitStats
from .trace import ExitTrace


def model_sizes(model) -> dict:
    """The sizes the FLOP formulas need, read off a mue_ofa model."""
    encoder, decoder = model.encoder, model.decoder
    return {
        "d": encoder.layer_norm.normalized_shape[0],
        "enc_ffn": encoder.layers[0].fc1.out_features,
        "dec_ffn": decoder.layers[0].fc1.out_features,
        "n_enc": len(encoder.layers),
        "n_dec": len(decoder.layers),
        "vocab": decoder.output_projection.out_features,
        "resnet_blocks": tuple(len(getattr(encoder.embed_images, f"layer{i}")) for i in (1, 2, 3)),
    }


def new_stats(model, encoder_average: str = "stream") -> ExitStats:
    sizes = model_sizes(model)
    return ExitStats(sizes["n_enc"], sizes["n_dec"], encoder_average=encoder_average)


def account(stats: ExitStats, trace: ExitTrace, sizes: dict) -> ExitStats:
    """Add everything recorded in `trace` to `stats`, then clear the trace."""
    d = sizes["d"]
    for rec in trace.encoder:
        stats.add_encoder(rec.image_depths, rec.text_depths, rec.image_tokens, rec.text_tokens)
        n_enc = sizes["n_enc"]
        for i in range(rec.text_depths.numel()):
            p, s = int(rec.image_tokens[i]), int(rec.text_tokens[i])
            if p and rec.image_hw:
                stem = resnet_stem_flops(rec.image_hw, d, sizes["resnet_blocks"])
                stats.add_flops("resnet_stem", stem, stem)
            if rec.joint:
                per_layer = encoder_layer_flops(p + s, p + s, d, sizes["enc_ffn"])
                depth = int(rec.text_depths[i])
                share = p / (p + s)
                stats.add_flops("encoder_image", depth * per_layer * share, n_enc * per_layer * share)
                stats.add_flops("encoder_text", depth * per_layer * (1 - share), n_enc * per_layer * (1 - share))
            else:
                if p:
                    per_layer = encoder_layer_flops(p, p, d, sizes["enc_ffn"])
                    stats.add_flops("encoder_image", int(rec.image_depths[i]) * per_layer, n_enc * per_layer)
                per_layer = encoder_layer_flops(s, s, d, sizes["enc_ffn"])
                stats.add_flops("encoder_text", int(rec.text_depths[i]) * per_layer, n_enc * per_layer)
    n_dec = sizes["n_dec"]
    out_proj = output_projection_flops(d, sizes["vocab"])
    for rec in trace.decoder:
        stats.add_decoder(rec.depths)
        rows = rec.depths.numel()
        if rec.n_past == 1:  # cross-attention keys/values: once per sequence, every layer
            kv = sum(cross_kv_flops(int(n), d) for n in rec.n_src) * n_dec
            stats.add_flops("cross_kv", kv, kv)
        spent = full = 0
        for i in range(rows):
            per_layer = decoder_layer_flops_step(d, sizes["dec_ffn"], rec.n_past, int(rec.n_src[i]))
            spent += int(rec.depths[i]) * per_layer
            full += n_dec * per_layer
        stats.add_flops("decoder_layers", spent, full)
        stats.add_flops("kv_fill", rec.kv_filled * kv_fill_flops(d), 0)
        stats.add_flops("output_projection", rows * out_proj, rows * out_proj)
    trace.clear()
    return stats
