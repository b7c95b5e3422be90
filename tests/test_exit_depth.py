"""--exit-depth K: every stream (image, text, decoder) stops after layer K at the latest; with the
thresholds at 1 that is the model cut to its first K layers (the report's forced-depth table)."""
import pytest
import torch

from mue.errors import OptionError
from mue.exiting.config import exit_config, exits_requested
from mue.exiting.settings import ExitSettings
from mue.exiting.trace import ExitTrace
from mue.models import build_arch
from ofa_reference import exits, randomize_, tiny_dictionary

LAYERS = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), dropout=0.0), seed=1).eval()


def batch(bsz=3, n_tgt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 44, (bsz, 6), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    prev = torch.randint(4, 44, (bsz, n_tgt), generator=g)
    prev[:, 0] = 0
    return src, torch.randn(bsz, 3, 48, 64, generator=g), torch.ones(bsz, dtype=torch.bool), prev


def cut(model, k):
    """The same model with only its first k encoder and decoder layers (what --exit-depth k must equal)."""
    import copy

    short = copy.deepcopy(model)
    short.encoder.layers = short.encoder.layers[:k]
    short.decoder.layers = short.decoder.layers[:k]
    return short


@torch.no_grad()
def decode(model, src, images, masks, prev, settings=None):
    """(encoder output, cached step-by-step decoder outputs, parallel decoder output)."""
    def run():
        enc = model.encoder(src, src.ne(1).sum(1), images, masks)
        state, steps = {}, []
        for t in range(prev.size(1)):
            steps.append(model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0][:, -1])
        return enc["encoder_out"][0], torch.stack(steps, 1), model.decoder(prev, encoder_out=enc)[0]

    if settings is None:
        return run()
    with exits(model, settings):
        return run()


@pytest.mark.parametrize("k", [1, 3])
def test_depth_k_is_the_model_cut_to_k_layers(model, k):
    src, images, masks, prev = batch()
    settings = ExitSettings(exit_config(exit_depth=k), trace=ExitTrace())
    enc, cached, parallel = decode(model, src, images, masks, prev, settings)
    enc_cut, cached_cut, parallel_cut = decode(cut(model, k), src, images, masks, prev)
    torch.testing.assert_close(enc, enc_cut, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, cached_cut, atol=1e-5, rtol=0)
    torch.testing.assert_close(parallel, parallel_cut, atol=1e-5, rtol=0)
    trace = settings.trace
    assert all(int(d.max()) == int(d.min()) == k for d in (trace.encoder[0].image_depths, trace.encoder[0].text_depths))
    assert all(int(r.depths.max()) == k for r in trace.decoder)
    full_enc, full_cached, _ = decode(model, src, images, masks, prev)
    assert not torch.allclose(cached, full_cached, atol=1e-3)  # a real cut, not the full model


def test_depth_limit_and_thresholds_combine(model):
    """With a threshold as well, rows stop at whichever comes first: never deeper than K."""
    src, images, masks, prev = batch()
    free = ExitSettings(exit_config(img_thres=0.87, txt_thres=0.87, dec_thres=0.87), trace=ExitTrace())
    capped = ExitSettings(exit_config(img_thres=0.87, txt_thres=0.87, dec_thres=0.87, exit_depth=4), trace=ExitTrace())
    decode(model, src, images, masks, prev, free)
    decode(model, src, images, masks, prev, capped)
    free_dec = torch.cat([r.depths.flatten() for r in free.trace.decoder])
    capped_dec = torch.cat([r.depths.flatten() for r in capped.trace.decoder])
    assert free_dec.max() > 4 and free_dec.min() < 4  # the cap binds somewhere, and the threshold elsewhere
    assert torch.equal(capped_dec, free_dec.clamp(max=4))
    assert torch.equal(capped.trace.encoder[0].image_depths, free.trace.encoder[0].image_depths.clamp(max=4))


def test_the_knob_is_validated_and_counts_as_an_exit():
    assert exit_config().exit_depth == 0 and not exits_requested(exit_config())
    assert exits_requested(exit_config(exit_depth=2))
    with pytest.raises(OptionError, match="--exit-depth must be an integer >= 0"):
        exit_config(exit_depth=-1)
    with pytest.raises(OptionError, match="--exit-depth must be an integer >= 0"):
        exit_config(exit_depth=1.5)
