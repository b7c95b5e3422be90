"""Turns an ExitTrace (what a model ran) into ExitStats (layers, Eq. 14, FLOPs by component).

Every count uses the real (non-padding) tokens of each row and the model's own sizes; the full
model's cost is counted on the same inputs, so spent/full is the FLOP-predicted speedup (against a
larger reference model's cost when `reference_sizes` is given, e.g. for an OFA-Tiny baseline).
"""
import functools
from typing import Optional

import torch

from .flops import (cross_kv_flops, decoder_layer_flops_step, encoder_layer_flops, imitation_head_flops,
                    kv_fill_flops, output_projection_flops, resnet_stem_flops)
from .stats import ExitStats
from .trace import ExitTrace


@functools.lru_cache(maxsize=32)
def _stem_flops(image_hw: tuple, d: int, blocks: tuple) -> int:
    """resnet_stem_flops, once per image size: it walks every ResNet block, and accounting asks per row."""
    return resnet_stem_flops(image_hw, d, blocks)


def model_sizes(model) -> dict:
    """The sizes the FLOP formulas need, read off a mue_ofa model (imitation heads included, if any)."""
    encoder, decoder = model.encoder, model.decoder
    heads = getattr(decoder, "exit_heads", None)
    return {
        "d": encoder.layer_norm.normalized_shape[0],
        "enc_ffn": encoder.layers[0].fc1.out_features,
        "dec_ffn": decoder.layers[0].fc1.out_features,
        "n_enc": len(encoder.layers),
        "n_dec": len(decoder.layers),
        "vocab": decoder.output_projection.out_features,
        "resnet_blocks": tuple(len(getattr(encoder.embed_images, f"layer{i}")) for i in (1, 2, 3)),
        "imitation_hidden": heads.hidden if heads is not None else 0,
    }


def arch_sizes(arch: str, vocab: int) -> dict:
    """The same sizes for a registered arch (e.g. the full model an OFA-Tiny run is compared with),
    without building it; ``vocab``: the dictionary size (the task's)."""
    from mue.models.mue_ofa import ARCHS  # here: mue.models must not be imported by mue.exiting at load

    if arch not in ARCHS:
        raise ValueError(f"unknown reference arch {arch!r}; choose from {sorted(ARCHS)}")
    a = ARCHS[arch]
    return {
        "d": a["encoder_embed_dim"], "enc_ffn": a["encoder_ffn_embed_dim"], "dec_ffn": a["decoder_ffn_embed_dim"],
        "n_enc": a["encoder_layers"], "n_dec": a["decoder_layers"], "vocab": int(vocab),
        "resnet_blocks": tuple(int(b) for b in a["resnet_blocks"].split(",")), "imitation_hidden": 0,
    }


def new_stats(model, encoder_average: str = "stream", reference_sizes: Optional[dict] = None) -> ExitStats:
    """ExitStats for `model`; with `reference_sizes` (model_sizes/arch_sizes of a larger model), Eq. 14
    is taken against the reference's depths."""
    sizes = model_sizes(model)
    ref = (reference_sizes["n_enc"], reference_sizes["n_dec"]) if reference_sizes else None
    return ExitStats(sizes["n_enc"], sizes["n_dec"], encoder_average=encoder_average, reference_layers=ref)


def account(stats: ExitStats, trace: ExitTrace, sizes: dict, reference_sizes: Optional[dict] = None) -> ExitStats:
    """Add everything recorded in `trace` to `stats`, then clear the trace.

    "spent" counts what this model ran; "full" what the full model would run on the same inputs: this
    model without exits, or the `reference_sizes` model (a larger one) when given. Exit decisions that
    project onto the vocabulary or run imitation heads are spent under "exit_classifier" (full: 0).
    """
    ref = reference_sizes or sizes
    d, rd = sizes["d"], ref["d"]
    rn_enc, rn_dec = ref["n_enc"], ref["n_dec"]
    host = _on_host(trace)
    for rec in trace.encoder:
        image_depths, text_depths, image_tokens, text_tokens = (host(t) for t in (
            rec.image_depths, rec.text_depths, rec.image_tokens, rec.text_tokens))
        encoded = [bool(p) for p in image_tokens] if rec.encoded is None else [bool(e) for e in host(rec.encoded)]
        stats.add_encoder(torch.tensor(image_depths, dtype=torch.long), torch.tensor(text_depths, dtype=torch.long),
                          torch.tensor(image_tokens, dtype=torch.long), torch.tensor(text_tokens, dtype=torch.long))
        reused_full = 0  # what the full model would spend on the images other rows' runs served
        for i, (p, s) in enumerate(zip(image_tokens, text_tokens)):
            if p and rec.image_hw:
                stem, ref_stem = (_stem_flops(rec.image_hw, d, sizes["resnet_blocks"]),
                                  _stem_flops(rec.image_hw, rd, ref["resnet_blocks"]))
                if encoded[i]:
                    stats.add_flops("resnet_stem", stem, ref_stem)
                else:
                    reused_full += ref_stem + rn_enc * encoder_layer_flops(p, p, rd, ref["enc_ffn"])
            if p and not rec.joint and not encoded[i]:  # its image stream was another row's
                stats.add_flops("encoder_text", text_depths[i] * encoder_layer_flops(s, s, d, sizes["enc_ffn"]),
                                rn_enc * encoder_layer_flops(s, s, rd, ref["enc_ffn"]))
                continue
            if rec.joint:
                per_layer = encoder_layer_flops(p + s, p + s, d, sizes["enc_ffn"])
                ref_layer = encoder_layer_flops(p + s, p + s, rd, ref["enc_ffn"])
                depth = text_depths[i]
                share = p / (p + s)
                stats.add_flops("encoder_image", depth * per_layer * share, rn_enc * ref_layer * share)
                stats.add_flops("encoder_text", depth * per_layer * (1 - share), rn_enc * ref_layer * (1 - share))
            else:
                if p:
                    stats.add_flops("encoder_image", image_depths[i] * encoder_layer_flops(p, p, d, sizes["enc_ffn"]),
                                    rn_enc * encoder_layer_flops(p, p, rd, ref["enc_ffn"]))
                stats.add_flops("encoder_text", text_depths[i] * encoder_layer_flops(s, s, d, sizes["enc_ffn"]),
                                rn_enc * encoder_layer_flops(s, s, rd, ref["enc_ffn"]))
        stats.add_image_reuse(sum(1 for p in image_tokens if p), sum(1 for p, e in zip(image_tokens, encoded) if p and e),
                              reused_full)
    out_proj, ref_out_proj = output_projection_flops(d, sizes["vocab"]), output_projection_flops(rd, ref["vocab"])
    head = imitation_head_flops(d, sizes["imitation_hidden"]) if sizes.get("imitation_hidden") else 0
    for rec in trace.decoder:
        depths, n_src = host(rec.depths), host(rec.n_src)
        ran = depths if rec.ran is None else host(rec.ran)
        stats.add_decoder(torch.tensor(depths, dtype=torch.long))
        spent = full = 0
        for layers, n in zip(ran, n_src):
            spent += layers * decoder_layer_flops_step(d, sizes["dec_ffn"], rec.n_past, n)
            full += rn_dec * decoder_layer_flops_step(rd, ref["dec_ffn"], rec.n_past, n)
        stats.add_flops("decoder_layers", spent, full)
        stats.add_flops("kv_fill", rec.kv_filled * kv_fill_flops(d), 0)
        stats.add_flops("output_projection", len(depths) * out_proj, len(depths) * ref_out_proj)
        if rec.exit_head_calls and not head:
            raise ValueError("account: the trace records imitation-head calls but `sizes` has no imitation_hidden "
                             "(read the sizes off the model with its exit heads: model_sizes(model))")
        stats.add_flops("exit_classifier", rec.exit_projections * out_proj + rec.exit_head_calls * head, 0)
    for rec in trace.cross_kv:  # cross-attention keys/values, per source and layer that computed them
        pairs = list(zip(host(rec.n_src), host(rec.layers)))
        stats.add_flops("cross_kv", sum(cross_kv_flops(n, d) * layers for n, layers in pairs),
                        sum(cross_kv_flops(n, rd) * rn_dec for n, _ in pairs) if rec.full else 0)
    trace.clear()
    return stats


def _on_host(trace: ExitTrace):
    """A function tensor -> list of ints for every tensor in `trace`, with all of them moved to the host in
    one transfer (one device sync per batch instead of one per record)."""
    tensors = [t for rec in trace.encoder for t in (rec.image_depths, rec.text_depths, rec.image_tokens,
                                                     rec.text_tokens, rec.encoded) if t is not None]
    tensors += [t for rec in trace.decoder for t in (rec.depths, rec.n_src, rec.ran) if t is not None]
    tensors += [t for rec in trace.cross_kv for t in (rec.n_src, rec.layers)]
    if not tensors:
        return lambda t: t.tolist()
    flat = torch.cat([t.reshape(-1).to(torch.long) for t in tensors]).cpu().tolist()
    lists, start = {}, 0
    for t in tensors:
        lists[id(t)] = flat[start:start + t.numel()]
        start += t.numel()
    return lambda t: lists[id(t)]
