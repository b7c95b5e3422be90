"""Where each token exited, as a picture: one self-contained HTML page for the API's results.

Each image is shown (embedded as base64 PNG) with its caption (or its hypotheses and answers); every
output token is coloured by the decoder layer it exited at, from bright (layer 1, early) to dark (the
last layer), with a legend, beside the image/text stream depths and the example's saving against the
full model (Eq. 14, FLOPs). A table of the words by their mean exit layer, over all results, shows at a
glance which words leave early (function words, on trained models) and which run deep (content words).
``python -m mue ... --html OUT.html`` writes it.
"""
import base64
import html
import io
from collections import defaultdict
from typing import Optional, Sequence

from PIL import Image

from mue.exiting.stats import reduction_text

THUMBNAIL = 256  # longest side of the embedded pictures, pixels
# viridis, dark (late exits) to bright (early exits)
PALETTE = ((0x44, 0x01, 0x54), (0x3b, 0x52, 0x8b), (0x21, 0x91, 0x8c), (0x5e, 0xc9, 0x62), (0xfd, 0xe7, 0x25))

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.meta,.stats{color:#555;font-size:13px} .summary{margin:10px 0;font-size:15px}
.legend span,.tok{display:inline-block;padding:2px 5px;margin:1px;border-radius:4px;font-family:monospace}
.legend span{min-width:18px;text-align:center}
.card{display:flex;gap:16px;border-top:1px solid #ddd;padding:14px 0}
.card img{width:__SIDE__px;height:auto;image-rendering:pixelated;border:1px solid #ccc;align-self:flex-start}
.file{font-weight:600;margin-bottom:6px;word-break:break-all} .text{font-size:18px;margin:6px 0}
.q{margin:8px 0} .q .hyp{font-style:italic}
.words .tok{font-size:13px}
""".replace("__SIDE__", str(THUMBNAIL))


def layer_colour(layer: int, n_layers: int) -> str:
    """CSS colour of an exit layer: bright for layer 1, dark for layer n_layers."""
    f = 1.0 - (layer - 1) / max(n_layers - 1, 1)
    pos = f * (len(PALETTE) - 1)
    i = min(int(pos), len(PALETTE) - 2)
    w = pos - i
    rgb = [round(a + (b - a) * w) for a, b in zip(PALETTE[i], PALETTE[i + 1])]
    return "#%02x%02x%02x" % tuple(rgb)


def _text_colour(background: str) -> str:
    r, g, b = (int(background[k:k + 2], 16) for k in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _chip(text: str, layer: int, n_layers: int, title: str) -> str:
    colour = layer_colour(layer, n_layers)
    shown = html.escape(text).replace(" ", "&nbsp;") or "&nbsp;"
    return (f'<span class="tok" style="background:{colour};color:{_text_colour(colour)}" '
            f'title="{html.escape(title)}">{shown}</span>')


def _tokens(result) -> str:
    n = result.exits.decoder_layers
    return "".join(_chip(tok, layer, n, f"{tok.strip() or tok}: exited at layer {layer} of {n}, log-prob {score:.3f}")
                   for tok, layer, score in zip(result.tokens, result.exits.token_layers, result.token_scores))


def _stats(e) -> str:
    image = f"image stream {e.image_layers}/{e.encoder_layers}" if e.image_layers is not None else "no image stream"
    return (f"{image} · text stream {e.text_layers}/{e.encoder_layers} · decoder "
            f"{e.mean_decoder_layers:.1f}/{e.decoder_layers} per token · expected time reduction "
            f"{reduction_text(e.expected_time_reduction)} (Eq. 14) · FLOPs {e.flops / 1e6:.1f} M of "
            f"{e.flops_full / 1e6:.1f} M (FLOPs reduction {reduction_text(e.flops_reduction)}) · "
            f"{1000 * e.seconds:.0f} ms")


def _thumbnail(image) -> str:
    if not isinstance(image, Image.Image):
        from mue.api.inputs import image_input

        image = image_input(image, 0).load()
    picture = image.convert("RGB")
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _word_table(results) -> str:
    layers = defaultdict(list)
    n = max(r.exits.decoder_layers for r in results)
    for r in results:
        for tok, layer in zip(r.tokens, r.exits.token_layers):
            layers[tok.strip() or tok].append(layer)
    rows = sorted(layers.items(), key=lambda kv: (sum(kv[1]) / len(kv[1]), kv[0]))
    chips = [_chip(f"{word} {sum(ls) / len(ls):.1f}", round(sum(ls) / len(ls)), n,
                   f"{word}: mean exit layer {sum(ls) / len(ls):.2f} over {len(ls)} token(s)") for word, ls in rows]
    return ('<section class="words"><h2>Words by mean exit layer (earliest first)</h2>' + "".join(chips)
            + "</section>")


def _summary(results, summary: Optional[dict]) -> str:
    spent, full = sum(r.exits.flops for r in results), sum(r.exits.flops_full for r in results)
    if summary is not None and summary.get("expected_time_reduction") is not None:
        eq14 = reduction_text(summary["expected_time_reduction"])
    else:
        mean = sum(r.exits.expected_time_reduction for r in results) / len(results)
        eq14 = f"{reduction_text(mean)} (mean over examples)"
    seconds = sum(r.exits.seconds for r in results)
    reduction = reduction_text(1 - spent / full if full else None)
    return (f'<div class="summary">{len(results)} result(s) against the full model: expected time reduction {eq14} '
            f"(Eq. 14) · FLOPs {spent / 1e9:.3f} G of {full / 1e9:.3f} G (FLOPs reduction {reduction}) · "
            f"wall clock {seconds:.2f} s</div>")


def render_html(results: Sequence, images: Optional[Sequence] = None, title: str = "Where each token exited",
                meta: str = "", summary: Optional[dict] = None) -> str:
    """The page for ``results`` (mue.api Caption or Entailment objects). ``images``: one per result (PIL
    images, paths or bytes); default: each result's ``source``, read as a file path. ``meta``: a line under
    the title (checkpoint, thresholds); ``summary``: the run's ExitStats.summary(), whose Eq. 14 (over all
    tokens) is shown instead of the mean over examples."""
    if not results:
        raise ValueError("render_html: no results")
    images = [r.source for r in results] if images is None else list(images)
    if len(images) != len(results):
        raise ValueError(f"render_html: {len(images)} images for {len(results)} results")
    n = max(r.exits.decoder_layers for r in results)
    colours = [layer_colour(k, n) for k in range(1, n + 1)]
    legend = "".join(f'<span style="background:{c};color:{_text_colour(c)}">{k}</span>'
                     for k, c in enumerate(colours, 1))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f'<div class="meta">{html.escape(meta)}</div>', _summary(results, summary),
             f'<div class="legend">decoder layer each token exited at: {legend} ({n} = the full depth; hover a token '
             "for its layer and log-probability)</div>"]
    cards = []
    for result, image in zip(results, images):  # consecutive results about one image share a card
        if cards and cards[-1][0] == result.source:
            cards[-1][2].append(result)
        else:
            cards.append((result.source, image, [result]))
    for source, image, group in cards:
        body = []
        for r in group:
            if hasattr(r, "hypothesis"):
                premise = f' (premise: "{html.escape(r.premise)}")' if r.premise else ""
                body.append(f'<div class="q"><span class="hyp">"{html.escape(r.hypothesis)}"</span>{premise} → '
                            f'<b>{html.escape(r.answer)}</b> ({html.escape(r.label)}) {_tokens(r)}'
                            f'<div class="stats">{_stats(r.exits)}</div></div>')
            else:
                body.append(f'<div class="text">{_tokens(r)}</div><div class="stats">score {r.score:.3f} · '
                            f"{_stats(r.exits)}</div>")
        parts.append(f'<div class="card"><img src="{_thumbnail(image)}" alt="{html.escape(source)}"><div>'
                     f'<div class="file">{html.escape(source)}</div>{"".join(body)}</div></div>')
    parts += [_word_table(results), "</body></html>\n"]
    return "".join(parts)
