"""Early exits and the decoder's key/value cache: thresholds >= 1 change nothing, cached decoding equals
the parallel forward (with and without exits, for each KV policy), rows do not affect each other, and
exits happen exactly where the cosine similarity crosses the threshold."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mue.exiting.config import exit_config
from mue.exiting.settings import ExitSettings
from mue.exiting.trace import ExitTrace
from mue.models import build_arch
from ofa_reference import exits, randomize_, tiny_dictionary

LAYERS = 6
DEC_THETA = 0.85  # with these weights decoder similarities run 0.3-0.93: exits are mixed


def _micro(mode="decomposed"):
    torch.manual_seed(0)
    model = build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), encoder_mode=mode, dropout=0.0)
    return randomize_(model, seed=1).eval()


@pytest.fixture(scope="module")
def model():
    return _micro()


def _batch(bsz=4, n_tgt=8, seed=0):
    """Rows: three with images (one with padded text), one without an image. Targets unpadded, starting
    with <s>, other tokens never <s> (tests rely on that)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 44, (bsz, 6), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[2, -2:], src[2, -3] = 1, 2
    images = torch.randn(bsz, 3, 48, 64, generator=g)
    masks = torch.ones(bsz, dtype=torch.bool)
    masks[-1] = False
    prev = torch.randint(4, 44, (bsz, n_tgt), generator=g)
    prev[:, 0] = 0
    return src, images, masks, prev


@torch.no_grad()
def _encode(model, src, images, masks):
    return model.encoder(src, src.ne(1).sum(1), images, masks)


@torch.no_grad()
def _parallel(model, prev, enc, **kwargs):
    return model.decoder(prev, encoder_out=enc, **kwargs)


@torch.no_grad()
def _cached(model, prev, enc):
    """Decode `prev` one token at a time through the incremental cache; logits [B, T, V]."""
    state, steps = {}, []
    for t in range(prev.size(1)):
        logits, _ = model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        assert logits.shape[1] == 1
        steps.append(logits[:, -1])
    return torch.stack(steps, 1)


def _trace_depths(trace):
    return torch.stack([record.depths for record in trace.decoder], 1)


def _dec_settings(kv_policy="copy", theta=DEC_THETA, **kw):
    return ExitSettings(exit_config(dec_thres=theta, kv_policy=kv_policy, **kw), trace=ExitTrace())


def _identity_(layer):
    """Make a (NormFormer) layer the identity: every residual branch ends in a LayerNorm or fc2 set to 0."""
    with torch.no_grad():
        for name in ("attn_ln", "self_attn_ln", "cross_attn_ln", "fc2"):
            if hasattr(layer, name):
                getattr(layer, name).weight.zero_()
                getattr(layer, name).bias.zero_()


# ---- thresholds >= 1 change nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["decomposed", "joint"])
def test_thresholds_of_one_are_bit_identical(mode):
    model = _micro(mode)
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    plain, cached = _parallel(model, prev, enc)[0], _cached(model, prev, enc)
    for settings in (ExitSettings(), ExitSettings(exit_config(kv_policy="drop"), trace=ExitTrace())):
        with exits(model, settings):
            enc_s = _encode(model, src, images, masks)
            assert torch.equal(enc_s["encoder_out"][0], enc["encoder_out"][0])
            assert torch.equal(_parallel(model, prev, enc_s)[0], plain)
            assert torch.equal(_cached(model, prev, enc_s), cached)


# ---- cache vs parallel -------------------------------------------------------------------------------------
def test_cached_decoding_equals_parallel(model):
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    torch.testing.assert_close(_cached(model, prev, enc), _parallel(model, prev, enc)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_policy", ["copy", "recompute"])
def test_cached_exits_equal_parallel_with_same_depths(model, kv_policy):
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    with exits(model, _dec_settings(kv_policy)) as settings:
        cached = _cached(model, prev, enc)
        depths = _trace_depths(settings.trace)
        assert depths.shape == prev.shape
        assert depths.min() < LAYERS and len(set(depths.flatten().tolist())) >= 3  # the test is not vacuous
        forced, extra = _parallel(model, prev, enc, forced_depths=depths)
        assert torch.equal(extra["exit_depths"], depths)
        torch.testing.assert_close(cached, forced, atol=1e-5, rtol=0)
        # the parallel forward deciding its own exits (copy semantics) takes the same decisions
        free, extra = _parallel(model, prev, enc)
        assert torch.equal(extra["exit_depths"], depths)
        torch.testing.assert_close(free, cached, atol=1e-5, rtol=0)


def test_recompute_equals_copy_and_fills_fewer_entries(model):
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    results = {}
    for kv_policy in ("copy", "recompute"):
        with exits(model, _dec_settings(kv_policy)) as settings:
            results[kv_policy] = (_cached(model, prev, enc), _trace_depths(settings.trace),
                                  sum(r.kv_filled for r in settings.trace.decoder))
    (copy_out, copy_depths, copy_filled), (re_out, re_depths, re_filled) = results["copy"], results["recompute"]
    assert torch.equal(copy_depths, re_depths)
    torch.testing.assert_close(re_out, copy_out, atol=1e-5, rtol=0)
    assert 0 < re_filled <= copy_filled
    # copy fills one entry per (row, step, skipped layer)
    assert copy_filled == int((LAYERS - copy_depths).clamp(min=0).sum())


def _bos_exits_after_layer_one(model):
    """Decoder layer 1 adds the same vector 2*x_bos to every position (attention branches off, FFN
    reduced to its output bias): <s> keeps its direction (similarity 1, exits at theta 0.99), other
    tokens turn by ~60 degrees (similarity ~0.45, carry on)."""
    model = copy.deepcopy(model)
    layer = model.decoder.layers[0]
    with torch.no_grad():
        for ln in (layer.self_attn_ln, layer.cross_attn_ln, layer.ffn_layernorm):
            ln.weight.zero_()
            ln.bias.zero_()
        x_bos = model.decoder.layernorm_embedding(model.decoder.embed_tokens.weight[0])
        layer.fc2.bias.copy_(2 * x_bos)
    return model


def test_drop_leaves_holes_that_copy_fills(model):
    model = _bos_exits_after_layer_one(model)
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    out = {}
    for kv_policy in ("copy", "drop"):
        with exits(model, _dec_settings(kv_policy, theta=0.99)) as settings:
            out[kv_policy] = _cached(model, prev, enc)
            depths = _trace_depths(settings.trace)
            assert depths[:, 0].tolist() == [1] * 4 and (depths[:, 1:] == LAYERS).all()
            if kv_policy == "drop":  # drop's parallel form masks the same holes
                forced = _parallel(model, prev, enc, forced_depths=depths)[0]
                torch.testing.assert_close(out["drop"], forced, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["drop"][:, 0], out["copy"][:, 0], atol=1e-6, rtol=0)
    # later tokens reach layers 2-6, where <s> has keys under copy and a hole under drop
    assert (out["drop"][:, 1:] - out["copy"][:, 1:]).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("kv_policy", ["copy", "recompute", "drop"])
def test_reordered_cache_continues_like_a_fresh_decode(model, kv_policy):
    """Beam search reorders rows mid-decode (fairseq's reorder_incremental_state_scripting): holes, exited
    states and keys must move with their rows."""
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    order = torch.tensor([2, 0, 0, 3])
    with exits(model, _dec_settings(kv_policy)):
        state, steps = {}, []
        with torch.no_grad():
            for t in range(prev.size(1)):
                if t == 3:
                    model.decoder.reorder_incremental_state_scripting(state, order)
                    enc, prev = model.encoder.reorder_encoder_out(enc, order), prev[order]
                    steps = [s[order] for s in steps]
                steps.append(model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0][:, -1])
        fresh = _cached(model, prev, enc)
    torch.testing.assert_close(torch.stack(steps, 1), fresh, atol=1e-5, rtol=0)


# ---- rows are independent ----------------------------------------------------------------------------------
def test_rows_do_not_affect_each_other_under_exits(model):
    src, images, masks, prev = _batch()
    settings = _dec_settings("copy", img_thres=0.8, txt_thres=0.6)
    with exits(model, settings):
        enc = _encode(model, src, images, masks)
        depths = enc["exit_depths"][0]
        assert depths[:, 1].unique().numel() > 1  # text streams exit at different depths
        together = _cached(model, prev, enc)
        alone = []
        for i in range(src.size(0)):
            rows = slice(i, i + 1)
            enc_i = _encode(model, src[rows], images[rows], masks[rows])
            assert torch.equal(enc_i["exit_depths"][0], depths[rows])
            alone.append(_cached(model, prev[rows], enc_i))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


# ---- exits happen where similarity crosses the threshold -----------------------------------------------------
def test_decoder_exit_layers_follow_similarity(model):
    """Expected depth of each position: the first layer whose output has cosine > theta with its input."""
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    states = _parallel(model, prev, enc, return_all_hiddens=True)[1]["inner_states"]  # no exits: full depth
    sims = torch.stack([F.cosine_similarity(states[i], states[i - 1], dim=-1) for i in range(1, LAYERS)])
    crossed = sims.transpose(0, 2) > DEC_THETA  # [B, T, layers 1..5]
    expected = torch.where(crossed.any(-1), crossed.float().argmax(-1) + 1, torch.tensor(LAYERS))
    with exits(model, _dec_settings("copy")) as settings:
        _cached(model, prev, enc)
    # positions decide on their own states, but those depend on earlier positions' (possibly exited)
    # states; position 0 depends on nothing earlier
    assert torch.equal(_trace_depths(settings.trace)[:, 0], expected[:, 0])


def test_identity_decoder_layer_is_where_tokens_exit(model):
    model = copy.deepcopy(model)
    _identity_(model.decoder.layers[2])
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    for kv_policy in ("copy", "recompute", "drop"):
        with exits(model, _dec_settings(kv_policy, theta=0.95)) as settings:
            _cached(model, prev, enc)
            assert (_trace_depths(settings.trace) == 3).all(), kv_policy
            assert (_parallel(model, prev, enc)[1]["exit_depths"] == 3).all()


@pytest.mark.parametrize("mode", ["decomposed", "joint"])
def test_identity_encoder_layer_is_where_streams_exit(mode):
    model = _micro(mode)
    _identity_(model.encoder.layers[1])
    src, images, masks, _ = _batch()
    short = copy.deepcopy(model)
    short.encoder.layers = short.encoder.layers[:1]
    trace = ExitTrace()
    with exits(model, ExitSettings(exit_config(img_thres=0.95, txt_thres=0.95), trace=trace)):
        out = _encode(model, src, images, masks)
    assert out["exit_depths"][0].tolist() == [[2, 2], [2, 2], [2, 2], [0, 2]]
    assert trace.encoder[0].text_depths.tolist() == [2, 2, 2, 2]
    # the exited state is the state after the identity layer, i.e. after layer 1
    expected = _encode(short, src, images, masks)["encoder_out"][0]
    keep = ~out["encoder_padding_mask"][0].T
    torch.testing.assert_close(out["encoder_out"][0][keep], expected[keep], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv_policy", ["copy", "recompute", "drop"])
def test_layers_after_every_row_exited_are_not_run(model, kv_policy):
    """Threshold 0: every token leaves after layer 1. The later layers must not run on an empty batch
    (wasted launches; on a GPU, bf16 attention over zero rows returned None), yet the caches they keep
    are filled as the policy says, and the result equals the parallel forward at those depths."""
    src, images, masks, prev = _batch()
    enc = _encode(model, src, images, masks)
    calls = []
    hooks = [layer.fc1.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0].size(0))))
             for i, layer in enumerate(model.decoder.layers)]
    try:
        with exits(model, _dec_settings(kv_policy, theta=0.0)) as settings:
            cached = _cached(model, prev, enc)
            depths = _trace_depths(settings.trace)
            filled = sum(record.kv_filled for record in settings.trace.decoder)
    finally:
        for hook in hooks:
            hook.remove()
    assert depths.eq(1).all()
    assert calls and {i for i, _ in calls} == {0}, sorted(set(calls))
    assert filled == (prev.numel() * (LAYERS - 1) if kv_policy == "copy" else 0)
    forced, _ = _parallel(model, prev, enc, forced_depths=depths)
    if kv_policy != "drop":  # drop leaves holes; the parallel forward has none
        torch.testing.assert_close(cached, forced, atol=1e-5, rtol=0)
