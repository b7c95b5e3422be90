"""ExitStats (Eq. 14, histograms, fairseq metrics) and analytic FLOPs."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mue.exiting import ExitStats, expected_time_reduction, flops


def two_sample_stats(encoder_average="stream"):
    # sample A: image ran 2 layers, text 4 -> stream mean 3; sample B: 6 and 6
    # decoder words exit at layers 1, 2, 6
    s = ExitStats(6, 6, encoder_average=encoder_average)
    s.add_encoder(torch.tensor([2, 6]), torch.tensor([4, 6]), 4, torch.tensor([2, 2]))
    s.add_decoder(torch.tensor([1, 2, 6]))
    return s


def test_eq14_hand_computed_stream_average():
    s = two_sample_stats()
    out = s.summary()
    # n_E = (3 + 6)/2 = 4.5 of 6 -> 0.75 ; decoder (1+2+6)/(3*6) = 0.5
    assert out["mean_encoder_layers"] == pytest.approx(4.5)
    assert out["mean_image_layers"] == pytest.approx(4.0)
    assert out["mean_text_layers"] == pytest.approx(5.0)
    assert out["mean_decoder_layers"] == pytest.approx(3.0)
    assert out["expected_time_reduction"] == pytest.approx(1 - (0.75 + 0.5) / 2)
    assert out["n_samples"] == 2 and out["n_tokens"] == 3


def test_eq14_hand_computed_token_average():
    out = two_sample_stats("token").summary()
    # (4*2 + 2*4 + 4*6 + 2*6) / 12 tokens = 52/12 layers
    assert out["mean_encoder_layers"] == pytest.approx(52 / 12)
    assert out["mean_encoder_layers_stream"] == pytest.approx(4.5)
    assert out["expected_time_reduction"] == pytest.approx(1 - (52 / 72 + 0.5) / 2)


def test_eq14_paper_example_and_full_depth():
    s = ExitStats(6, 6)
    s.add_encoder([3], [3], 900, [20])
    s.add_decoder([1, 2, 6])
    assert s.summary()["expected_time_reduction"] == pytest.approx(0.5)
    full = ExitStats(6, 4)
    full.add_encoder([6, 6], [6, 6], 10, [3, 5])
    full.add_decoder(torch.full((2, 7), 4))
    assert full.summary()["expected_time_reduction"] == 0.0
    assert expected_time_reduction(1.0, 1.0) == 0.0


def test_row_without_image_counts_text_only():
    s = ExitStats(6, 6)
    s.add_encoder([0, 2], [4, 4], torch.tensor([0, 9]), [5, 5])
    out = s.summary()
    assert out["mean_encoder_layers"] == pytest.approx((4 + 3) / 2)
    assert out["image_exit_histogram"][2] == 1 and sum(out["image_exit_histogram"].values()) == 1
    assert out["n_image_tokens"] == 9 and out["n_text_tokens"] == 10


def test_histograms():
    s = ExitStats(4, 3)
    s.add_encoder([1, 1, 4], [2, 3, 3], 5, [1, 1, 1])
    s.add_decoder([[1, 3, 3], [2, 3, 3]])
    out = s.summary()
    assert out["image_exit_histogram"] == {1: 2, 2: 0, 3: 0, 4: 1}
    assert out["text_exit_histogram"] == {1: 0, 2: 1, 3: 2, 4: 0}
    assert out["decoder_exit_histogram"] == {1: 1, 2: 1, 3: 4}


@pytest.mark.parametrize("call, match", [
    (lambda s: s.add_decoder([1, 7]), r"depths\[1\] = 7 outside \[1, 6\]"),
    (lambda s: s.add_decoder([0]), r"depths\[0\] = 0 outside"),
    (lambda s: s.add_decoder([1.5]), "must hold integers"),
    (lambda s: s.add_encoder([1, 9], [1, 1], 4, [1, 1]), r"image_depths.*\[1\] = 9"),
    (lambda s: s.add_encoder([1], [1, 2], 4, [1, 1]), "1 rows, text_depths 2"),
    (lambda s: s.add_encoder([1], [1], 0, [0]), "row 0 has neither image nor text"),
    (lambda s: s.add_flops("decoder", 1, 2), "unknown component 'decoder'"),
    (lambda s: s.add_flops("kv_fill", -1, 0), "spent must be finite"),
    (lambda s: s.add_time(float("nan")), "seconds must be finite"),
])
def test_bad_input_is_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call(ExitStats(6, 6))


def test_bad_config():
    with pytest.raises(ValueError, match="encoder_average must be one of"):
        ExitStats(6, 6, encoder_average="mean")
    with pytest.raises(ValueError, match="n_dec_layers must be an integer >= 1"):
        ExitStats(6, 0)


def test_flops_and_time():
    s = ExitStats(6, 6)
    s.add_flops("resnet_stem", 100, 100)
    s.add_flops("decoder_layers", 30, 90)
    s.add_flops("kv_fill", 10, 0)
    s.add_time(1.5)
    out = s.summary()
    assert out["flops_spent"] == 140 and out["flops_full"] == 190
    assert out["flops_reduction"] == pytest.approx(1 - 140 / 190)
    assert out["flops_by_component"]["kv_fill"] == {"spent": 10, "full": 0}
    assert out["wall_clock_s"] == 1.5
    assert out["expected_time_reduction"] is None  # no depths yet
    assert "FLOPs" in s.format_table() and "n/a" in s.format_table()


def test_format_table_mentions_numbers():
    table = two_sample_stats().format_table()
    assert "N_E=6" in table and "time reduction (Eq. 14): 37.5 %" in table and "L6:1" in table


def test_fairseq_metrics_sum_over_workers_and_derive_eq14():
    from fairseq.logging import metrics

    workers = [ExitStats(6, 6), ExitStats(6, 6)]
    workers[0].add_encoder([2], [4], 4, [2])
    workers[0].add_decoder([1, 2])
    workers[1].add_encoder([6], [6], 4, [2])
    workers[1].add_decoder([6])
    with metrics.aggregate(new_root=True) as agg:
        for w in workers:
            ExitStats.log_sums(w.sums())
        meters = agg.get_smoothed_values()
    expected = two_sample_stats().summary()["expected_time_reduction"]
    assert meters["mue_time_reduction"] == pytest.approx(expected)
    assert meters["mue_dec_layers_frac"] == pytest.approx(0.5)
    assert ExitStats.derived_from_meters(agg) == pytest.approx(expected)
    assert math.isnan(ExitStats.derived_from_meters({}))
    # the raw sums are hidden from progress logs but present as meters
    assert "_mue_enc_depth_sum" in agg and "_mue_enc_depth_sum" not in meters


# ----------------------------------------------------------------- FLOPs
def test_encoder_layer_flops_hand_computed():
    # n=2 queries, k=3 keys, d=4, ffn=8: q,out 2*2*16 ; k,v 2*3*16 ; attn 2*2*3*4 ; ffn 2*2*4*8
    assert flops.encoder_layer_flops(2, 3, 4, 8) == 2 * (64 + 96 + 48 + 128)


def test_encoder_layer_flops_matches_torch_flop_counter():
    n, k, d, ffn = 3, 7, 8, 16
    mha = torch.nn.MultiheadAttention(d, 2, batch_first=True)
    ff = torch.nn.Sequential(torch.nn.Linear(d, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, d))
    q, kv = torch.randn(1, n, d), torch.randn(1, k, d)
    with FlopCounterMode(display=False) as counter:
        ff(mha(q, kv, kv, need_weights=True)[0])
    assert flops.encoder_layer_flops(n, k, d, ffn) == counter.get_total_flops()


def test_decoder_step_and_small_components():
    # d=4, ffn=8, 3 self keys, 5 source tokens:
    # self q,k,v,out 4*16 ; self attn 2*3*4 ; cross q,out 2*16 ; cross attn 2*5*4 ; ffn 2*4*8
    assert flops.decoder_layer_flops_step(4, 8, 3, 5) == 2 * (64 + 24 + 32 + 40 + 64)
    assert flops.cross_kv_flops(5, 4) == 2 * 2 * 5 * 16
    assert flops.output_projection_flops(4, 10) == 80
    assert flops.kv_fill_flops(4) == 64
    with pytest.raises(ValueError, match="flops.output_projection_flops: vocab must be an integer >= 1"):
        flops.output_projection_flops(4, 0)


def test_resnet_stem_hand_computed_tiny():
    # 8x8 image, width 2, one stage of one block, d_model 3:
    # conv1 -> 4x4: 4*4*2*3*49 = 4704 ; maxpool -> 2x2
    # block: 1x1 2*2*2*2=16, 3x3 2*2*2*2*9=144, expand 2*2*2*8=64, downsample 64 ; proj 2*2*8*3=96
    assert flops.resnet_stem_flops(8, d_model=3, blocks=(1,), width=2) == 2 * (4704 + 288 + 96)


def test_resnet_stem_matches_torchvision_convs():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet50(weights=None)
    stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    macs = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        macs.append(output[0].numel() * module.in_channels // module.groups * k)

    for m in stem.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        out = stem.eval()(torch.randn(1, 3, 64, 48))
    assert out.shape[1:] == (1024, 4, 3)
    ours = flops.resnet_stem_flops((64, 48), d_model=0, blocks=(3, 4, 6))
    assert ours == 2 * sum(macs)
    assert flops.resnet_stem_grid((64, 48)) == (4, 3)
    assert flops.resnet_stem_grid(480) == (30, 30)
