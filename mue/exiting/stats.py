"""ExitStats: what early exiting saved over a run (layers, Eq. 14, FLOPs, wall-clock).

One accumulator for training-time validation and fairseq-generate alike.  It keeps
histograms (not per-sample lists), so memory does not grow with the data set; its raw
sums (``sums()``) add up across batches and workers through fairseq's metrics (``log_sums``).

Expected time reduction rate (paper Eq. 14)::

    ETR = 1 - ( n_E / N_E  +  sum_i w_i n_D,i / sum_i w_i N_D ) / 2

N_E, N_D: encoder and decoder depth; w_i: number of words (decoder tokens) that
exited at exit point i, n_D,i the layers they ran (so the decoder term is the mean
decoder depth over tokens, divided by N_D); n_E: the encoder layers used.

How the two encoder streams (image, text) make n_E, option ``encoder_average``:
  * ``'stream'`` (default): per sample, the mean depth of its streams,
    ``(image_depth + text_depth) / 2``, then the mean over samples.  Each stream
    counts equally, as the decomposed encoder treats the two streams
    symmetrically.  A row without an image (0 image tokens) counts its text
    stream only.
  * ``'token'``: token-weighted, ``sum(img_tok*img_depth + txt_tok*txt_depth) /
    sum(img_tok + txt_tok)``.  Closer to compute, since image tokens (900 at
    480 px) usually dominate the ~20 text tokens.
Both are reported; ``encoder_average`` picks the one that enters Eq. 14.

Against a larger model (``reference_layers=(N_E_ref, N_D_ref)``, e.g. OFA-Tiny against the full
model): Eq. 14 divides this model's mean layers by the reference's depths instead of its own, and
accounting (``mue.exiting.accounting.account`` with ``reference_sizes``) counts the reference model's
FLOPs as "full", so ``flops_reduction`` is against the reference.

A stream "exists" in a row when it has > 0 tokens; its depth must then be in
[1, N_E] (layer 1 is always run).  Depths of absent streams are ignored.
"""
import math
from collections import Counter
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["ExitStats", "FLOP_COMPONENTS", "ENCODER_AVERAGES", "expected_time_reduction", "reduction_text"]

FLOP_COMPONENTS = (
    "resnet_stem",
    "encoder_image",
    "encoder_text",
    "cross_kv",
    "decoder_layers",
    "kv_fill",
    "output_projection",
    "exit_classifier",  # exit decisions that project onto the vocabulary / run imitation heads (baselines)
)
ENCODER_AVERAGES = ("stream", "token")

# raw sums logged to fairseq metrics; the leading "_" hides them from progress logs
_SUM_KEYS = (
    "n_samples", "n_tokens", "enc_depth_sum", "enc_full_sum", "dec_depth_sum",
    "dec_full_sum", "flops_spent", "flops_full", "wall_clock_s",
)


def expected_time_reduction(enc_ratio: float, dec_ratio: float) -> float:
    """Eq. 14 from the two used/full ratios: ``1 - (enc_ratio + dec_ratio) / 2``."""
    return 1.0 - (enc_ratio + dec_ratio) / 2.0


def reduction_text(fraction: Optional[float], digits: int = 1) -> str:
    """A saving as every mue printout writes it, the paper's way: 0.402 -> ``"40.2 %"`` (positive: less
    than the full model; negative: more), ``"n/a"`` for None. Printers say what is reduced before it
    ("time reduction 40.2 %", "FLOPs reduction 14.7 %"), so one sign convention holds everywhere."""
    if fraction is None or not math.isfinite(float(fraction)):
        return "n/a"
    return f"{100.0 * float(fraction) + 0.0:.{digits}f} %"


def _as_long_1d(value, name: str, where: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"ExitStats.{where}: {name} must hold integers, got dtype {t.dtype}")
    return t.detach().to("cpu", torch.long).reshape(-1)


def _check_range(depths: torch.Tensor, name: str, where: str, high: int):
    bad = (depths < 1) | (depths > high)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"ExitStats.{where}: {name}[{i}] = {int(depths[i])} outside [1, {high}]"
        )


def _meter_value(meters: Mapping, key: str) -> float:
    if key not in meters:
        return float("nan")
    value = meters[key]
    value = getattr(value, "sum", value)  # fairseq SumMeter or a plain number
    return float(value)


class ExitStats:
    """Accumulate exit depths, FLOPs and time over a run.

    Args:
        n_enc_layers: N_E, encoder layers of the full model.
        n_dec_layers: N_D, decoder layers of the full model.
        encoder_average: ``'stream'`` or ``'token'``, how n_E enters Eq. 14 (module doc).
        reference_layers: optional ``(N_E_ref, N_D_ref)`` of a larger reference model, each >= this
            model's: Eq. 14 and the logged full-layer sums use them (module doc).
    """

    def __init__(self, n_enc_layers: int, n_dec_layers: int, encoder_average: str = "stream",
                 reference_layers: Optional[Sequence[int]] = None):
        for name, value in (("n_enc_layers", n_enc_layers), ("n_dec_layers", n_dec_layers)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"ExitStats: {name} must be an integer >= 1, got {value!r}")
        if encoder_average not in ENCODER_AVERAGES:
            raise ValueError(
                f"ExitStats: encoder_average must be one of {list(ENCODER_AVERAGES)}, "
                f"got {encoder_average!r}"
            )
        self.n_enc_layers = int(n_enc_layers)
        self.n_dec_layers = int(n_dec_layers)
        self.reference_layers = None
        if reference_layers is not None:
            ref = tuple(reference_layers)
            if (len(ref) != 2 or any(isinstance(v, bool) or int(v) != v for v in ref)
                    or ref[0] < self.n_enc_layers or ref[1] < self.n_dec_layers):
                raise ValueError(f"ExitStats: reference_layers must be (N_E_ref, N_D_ref), integers >= this "
                                 f"model's ({self.n_enc_layers}, {self.n_dec_layers}), got {reference_layers!r}")
            self.reference_layers = (int(ref[0]), int(ref[1]))
        self.encoder_average = encoder_average
        self.image_hist: Counter = Counter()   # depth -> samples (rows with an image)
        self.text_hist: Counter = Counter()    # depth -> samples (rows with text)
        self.decoder_hist: Counter = Counter() # depth -> tokens
        self.n_samples = 0
        self.enc_stream_depth_sum = 0.0        # sum over samples of mean stream depth
        self.enc_token_depth_sum = 0           # sum of tokens * depth, both streams
        self.image_tokens = 0
        self.text_tokens = 0
        self.flops_spent: Dict[str, float] = {c: 0 for c in FLOP_COMPONENTS}
        self.flops_full: Dict[str, float] = {c: 0 for c in FLOP_COMPONENTS}
        self.wall_clock_s = 0.0
        self.image_rows = 0  # rows with an image
        self.images_encoded = 0  # image-stream runs (rows sharing an image share one; cached images need none)
        self.reuse_flops_full = 0.0  # what the full model would spend on the image streams reuse served

    # ------------------------------------------------------------------ adding
    def add_encoder(self, image_depths, text_depths, image_tokens, text_tokens):
        """Add one batch's encoder exits.

        Args:
            image_depths, text_depths: ``LongTensor[B]``, layers each stream ran.
            image_tokens: ``LongTensor[B]`` or an int for all rows (0 = no image).
            text_tokens: ``LongTensor[B]`` or an int, non-padding text tokens.
        """
        img_d = _as_long_1d(image_depths, "image_depths", "add_encoder")
        txt_d = _as_long_1d(text_depths, "text_depths", "add_encoder")
        bsz = img_d.numel()
        if txt_d.numel() != bsz:
            raise ValueError(
                f"ExitStats.add_encoder: image_depths has {bsz} rows, text_depths {txt_d.numel()}"
            )
        img_n = _as_long_1d(image_tokens, "image_tokens", "add_encoder")
        txt_n = _as_long_1d(text_tokens, "text_tokens", "add_encoder")
        img_n = img_n.expand(bsz) if img_n.numel() == 1 else img_n
        txt_n = txt_n.expand(bsz) if txt_n.numel() == 1 else txt_n
        for name, t in (("image_tokens", img_n), ("text_tokens", txt_n)):
            if t.numel() != bsz:
                raise ValueError(f"ExitStats.add_encoder: {name} has {t.numel()} rows, expected {bsz}")
            if (t < 0).any():
                raise ValueError(f"ExitStats.add_encoder: {name} has negative entries")
        has_img, has_txt = img_n > 0, txt_n > 0
        empty = ~(has_img | has_txt)
        if empty.any():
            raise ValueError(
                f"ExitStats.add_encoder: row {int(empty.nonzero()[0])} has neither image nor text tokens"
            )
        _check_range(img_d[has_img], "image_depths (rows with an image)", "add_encoder", self.n_enc_layers)
        _check_range(txt_d[has_txt], "text_depths (rows with text)", "add_encoder", self.n_enc_layers)

        self.image_hist.update(img_d[has_img].tolist())
        self.text_hist.update(txt_d[has_txt].tolist())
        n_streams = has_img.long() + has_txt.long()
        depth_sum = img_d * has_img + txt_d * has_txt
        self.enc_stream_depth_sum += float((depth_sum.double() / n_streams).sum())
        self.enc_token_depth_sum += int((img_d * img_n * has_img + txt_d * txt_n * has_txt).sum())
        self.image_tokens += int(img_n.sum())
        self.text_tokens += int(txt_n.sum())
        self.n_samples += bsz

    def add_decoder(self, depths):
        """Add decoder exits: ``LongTensor`` (any shape) of layers run per token.
        Pass only real (non-padding) generated or scored tokens."""
        d = _as_long_1d(depths, "depths", "add_decoder")
        _check_range(d, "depths", "add_decoder", self.n_dec_layers)
        self.decoder_hist.update(d.tolist())

    def add_flops(self, component: str, spent, full):
        """Add FLOPs of one component: ``spent`` (what ran) and ``full`` (no exits)."""
        if component not in FLOP_COMPONENTS:
            raise ValueError(
                f"ExitStats.add_flops: unknown component {component!r}, expected one of "
                f"{list(FLOP_COMPONENTS)}"
            )
        for name, v in (("spent", spent), ("full", full)):
            v = float(v)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"ExitStats.add_flops({component!r}): {name} must be finite and >= 0, got {v}")
        self.flops_spent[component] += spent.item() if torch.is_tensor(spent) else spent
        self.flops_full[component] += full.item() if torch.is_tensor(full) else full

    def add_image_reuse(self, rows: int, encoded: int, flops_full_saved: float):
        """Rows with an image, image-stream runs made for them, and the full model's FLOPs for the runs
        that were shared (stem + image layers), which "flops_full" leaves out."""
        if not 0 <= encoded <= rows:
            raise ValueError(f"ExitStats.add_image_reuse: {encoded} images encoded for {rows} rows")
        self.image_rows += int(rows)
        self.images_encoded += int(encoded)
        self.reuse_flops_full += float(flops_full_saved)

    def add_time(self, seconds: float):
        """Add measured wall-clock seconds (the generator times each batch)."""
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"ExitStats.add_time: seconds must be finite and >= 0, got {seconds}")
        self.wall_clock_s += seconds

    # ---------------------------------------------------------------- reading
    @property
    def eq14_layers(self) -> Tuple[int, int]:
        """(N_E, N_D) that Eq. 14 divides by: the reference's when given, else this model's."""
        return self.reference_layers or (self.n_enc_layers, self.n_dec_layers)

    @property
    def n_tokens(self) -> int:
        return sum(self.decoder_hist.values())

    @staticmethod
    def _mean(hist: Counter) -> Optional[float]:
        n = sum(hist.values())
        return sum(k * v for k, v in hist.items()) / n if n else None

    def _full_hist(self, hist: Counter, n_layers: int) -> Dict[int, int]:
        return {layer: int(hist.get(layer, 0)) for layer in range(1, n_layers + 1)}

    def sums(self) -> Dict[str, float]:
        """Raw, summable numbers (for fairseq logging outputs / metrics)."""
        if self.encoder_average == "stream":
            enc_depth, enc_full = self.enc_stream_depth_sum, self.n_samples * self.eq14_layers[0]
        else:
            enc_tokens = self.image_tokens + self.text_tokens
            enc_depth, enc_full = self.enc_token_depth_sum, enc_tokens * self.eq14_layers[0]
        return {
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "enc_depth_sum": enc_depth,
            "enc_full_sum": enc_full,
            "dec_depth_sum": sum(k * v for k, v in self.decoder_hist.items()),
            "dec_full_sum": self.n_tokens * self.eq14_layers[1],
            "flops_spent": sum(self.flops_spent.values()),
            "flops_full": sum(self.flops_full.values()),
            "wall_clock_s": self.wall_clock_s,
        }

    def summary(self) -> dict:
        """All reported numbers.  Values that have no data yet are ``None``;
        ``expected_time_reduction`` needs both encoder samples and decoder tokens. "flops_full" is the full
        model on the same inputs with the same exact sharing (one image-stream run per image, one set of
        cross keys/values per source); "flops_full_without_reuse" runs every row's image."""
        s = self.sums()
        enc_tokens = self.image_tokens + self.text_tokens
        stream_mean = self.enc_stream_depth_sum / self.n_samples if self.n_samples else None
        token_mean = self.enc_token_depth_sum / enc_tokens if enc_tokens else None
        enc_mean = stream_mean if self.encoder_average == "stream" else token_mean
        dec_mean = self._mean(self.decoder_hist)
        etr = None
        if enc_mean is not None and dec_mean is not None:
            ref_enc, ref_dec = self.eq14_layers
            etr = expected_time_reduction(enc_mean / ref_enc, dec_mean / ref_dec)
        full = s["flops_full"]
        return {
            "n_enc_layers": self.n_enc_layers,
            "n_dec_layers": self.n_dec_layers,
            "reference_layers": list(self.reference_layers) if self.reference_layers else None,
            "encoder_average": self.encoder_average,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "n_image_tokens": self.image_tokens,
            "n_text_tokens": self.text_tokens,
            "mean_image_layers": self._mean(self.image_hist),
            "mean_text_layers": self._mean(self.text_hist),
            "mean_encoder_layers": enc_mean,
            "mean_encoder_layers_stream": stream_mean,
            "mean_encoder_layers_token": token_mean,
            "mean_decoder_layers": dec_mean,
            "image_exit_histogram": self._full_hist(self.image_hist, self.n_enc_layers),
            "text_exit_histogram": self._full_hist(self.text_hist, self.n_enc_layers),
            "decoder_exit_histogram": self._full_hist(self.decoder_hist, self.n_dec_layers),
            "expected_time_reduction": etr,
            "flops_spent": s["flops_spent"],
            "flops_full": full,
            "flops_reduction": 1.0 - s["flops_spent"] / full if full else None,
            "flops_by_component": {
                c: {"spent": self.flops_spent[c], "full": self.flops_full[c]} for c in FLOP_COMPONENTS
            },
            "wall_clock_s": self.wall_clock_s,
            "image_rows": self.image_rows,
            "images_encoded": self.images_encoded,
            "image_reuse": self.image_rows / self.images_encoded if self.images_encoded else None,
            "flops_full_without_reuse": full + self.reuse_flops_full,
        }

    def format_table(self) -> str:
        """A short human-readable report."""
        s = self.summary()

        def num(v, fmt="{:.2f}"):
            return "n/a" if v is None else fmt.format(v)

        ne, nd = self.n_enc_layers, self.n_dec_layers
        hist = " ".join(f"L{k}:{v}" for k, v in s["decoder_exit_histogram"].items())
        lines = [
            f"MuE exit statistics (N_E={ne}, N_D={nd}, encoder average: {self.encoder_average})",
            f"  samples {s['n_samples']}, decoder tokens {s['n_tokens']}",
            f"  mean layers: image {num(s['mean_image_layers'])}/{ne}  text {num(s['mean_text_layers'])}/{ne}"
            f"  encoder {num(s['mean_encoder_layers'])}/{ne}  decoder {num(s['mean_decoder_layers'])}/{nd}",
            f"  decoder exits: {hist}",
            f"  expected time reduction (Eq. 14): {reduction_text(s['expected_time_reduction'])}"
            + (f" against a reference of N_E={self.eq14_layers[0]}, N_D={self.eq14_layers[1]}"
               if self.reference_layers else ""),
            f"  FLOPs: {s['flops_spent'] / 1e9:.3f} G of {s['flops_full'] / 1e9:.3f} G"
            f" (FLOPs reduction {reduction_text(s['flops_reduction'])})",
            f"  wall clock: {s['wall_clock_s']:.2f} s",
        ]
        if self.images_encoded < self.image_rows:
            lines.insert(-1, f"  images: {s['images_encoded']} encoded for {s['image_rows']} rows (reuse "
                             f"{num(s['image_reuse'])}x; the full model without reuse: "
                             f"{s['flops_full_without_reuse'] / 1e9:.3f} G)")
        return "\n".join(lines)

    # --------------------------------------------------------- fairseq metrics
    @staticmethod
    def log_sums(sums: Mapping[str, float], prefix: str = "_mue_"):
        """Log already-summed numbers (e.g. from a criterion's reduced logging
        outputs) and register derived meters ``mue_time_reduction``,
        ``mue_enc_layers_frac``, ``mue_dec_layers_frac``, ``mue_flops_reduction``."""
        from fairseq.logging import metrics

        for key in _SUM_KEYS:
            if key in sums:
                metrics.log_scalar_sum(prefix + key, float(sums[key]))
        metrics.log_derived(
            "mue_time_reduction", lambda m: ExitStats.derived_from_meters(m, prefix)
        )

        def ratio(m, num, den):
            d = _meter_value(m, prefix + den)
            return _meter_value(m, prefix + num) / d if d else float("nan")

        metrics.log_derived("mue_enc_layers_frac", lambda m: ratio(m, "enc_depth_sum", "enc_full_sum"))
        metrics.log_derived("mue_dec_layers_frac", lambda m: ratio(m, "dec_depth_sum", "dec_full_sum"))
        metrics.log_derived(
            "mue_flops_reduction", lambda m: 1.0 - ratio(m, "flops_spent", "flops_full")
        )

    @staticmethod
    def derived_from_meters(meters: Mapping, prefix: str = "_mue_") -> float:
        """Eq. 14 from summed meters (fairseq ``log_derived``); NaN without data."""
        enc_full = _meter_value(meters, prefix + "enc_full_sum")
        dec_full = _meter_value(meters, prefix + "dec_full_sum")
        if not (enc_full > 0 and dec_full > 0):
            return float("nan")
        return expected_time_reduction(
            _meter_value(meters, prefix + "enc_depth_sum") / enc_full,
            _meter_value(meters, prefix + "dec_depth_sum") / dec_full,
        )

    def __repr__(self):
        return (f"ExitStats(N_E={self.n_enc_layers}, N_D={self.n_dec_layers}, "
                f"samples={self.n_samples}, tokens={self.n_tokens})")
