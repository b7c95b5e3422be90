"""mue_ofa: OFA-base's size and state-dict layout, the decomposed encoder's stream independence and
depth limits, and clear errors on bad input and mismatched checkpoints. All on the micro arch except
the size check."""
import copy
import os

import pytest
import torch

from mue.models import build_arch
from mue.models.state_dict import CheckpointMismatchError
from ofa_reference import OFAReference, randomize_, tiny_dictionary

# OFA-base's state-dict layout (every key, shape, dtype), read off the official checkpoint (docs/OFA.md,
# "Checkpoint layout"), kept with the tests so they run from any checkout
TSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ofa_base_state_dict.tsv")
DERIVED = ("version", "token_rp_bucket", "image_rp_bucket", "image_position_idx")


def _micro(mode="decomposed", n_words=40, seed=1):
    torch.manual_seed(0)
    model = build_arch("mue_ofa_micro", dictionary=tiny_dictionary(n_words), encoder_mode=mode, dropout=0.0)
    return randomize_(model, seed=seed).eval()


@pytest.fixture(scope="module")
def decomposed():
    return _micro("decomposed")


@pytest.fixture(scope="module")
def joint():
    return _micro("joint")


def _inputs(seed=0, n_text=6, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 44, (3, n_text), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[2, -2:] = 1
    src[2, -3] = 2
    images = torch.randn(3, 3, 48, 64, generator=g)  # 3 x 4 patch grid
    masks = torch.tensor([True, True, not with_mask])
    return src, src.ne(1).sum(1), images, masks


def _encode(model, src, lengths, images, masks, **limits):
    with torch.no_grad():
        out = model.encoder(src, lengths, images, masks, **limits)
    return out["encoder_out"][0], out["exit_depths"][0]


def _truncated(model, depth):
    """A copy of the model whose encoder has only its first `depth` layers."""
    short = copy.deepcopy(model)
    short.encoder.layers = short.encoder.layers[:depth]
    return short


# ---- OFA-base layout ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return build_arch("mue_ofa_base")


def test_base_parameter_count(base):
    n = sum(p.numel() for p in base.parameters())
    assert abs(n - 182.24e6) / 182.24e6 < 1e-3, n


def test_base_state_dict_matches_ofa(base):
    expected = {}
    with open(TSV) as f:
        for line in f:
            name, shape = line.rstrip("\n").split("\t")[:2]
            if name.rsplit(".", 1)[-1] not in DERIVED:
                expected[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    ours = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


# ---- decomposed encoder --------------------------------------------------------------------------------
def test_decomposed_streams_are_independent(decomposed):
    src, lengths, images, masks = _inputs()
    n_image = 12
    out, _ = _encode(decomposed, src, lengths, images, masks)
    assert out.shape[0] == n_image + src.size(1)

    other_text = src.clone()
    other_text[:, 1:3] = 4 + (other_text[:, 1:3] - 4 + 7) % 40  # other words, same padding
    out_t, _ = _encode(decomposed, other_text, lengths, images, masks)
    assert torch.equal(out_t[:n_image], out[:n_image])
    assert not torch.allclose(out_t[n_image:], out[n_image:])

    out_i, _ = _encode(decomposed, src, lengths, images.flip(0) * 0.5, masks)
    assert torch.equal(out_i[n_image:], out[n_image:])
    assert not torch.allclose(out_i[:n_image, :2], out[:n_image, :2])


def test_image_depth_limit_runs_first_layers(decomposed):
    src, lengths, images, masks = _inputs()
    full, _ = _encode(decomposed, src, lengths, images, masks)
    for p in (1, 3):
        limited, depths = _encode(decomposed, src, lengths, images, masks, max_image_depth=p)
        by_hand, _ = _encode(_truncated(decomposed, p), src, lengths, images, masks)
        torch.testing.assert_close(limited[:12, :2], by_hand[:12, :2], atol=1e-6, rtol=0)  # rows with an image
        assert torch.equal(limited[12:], full[12:])  # text stream untouched
        assert depths[:, 0].tolist() == [p, p, 0] and depths[:, 1].tolist() == [6, 6, 6]
        # and against the independent OFA reference, decomposed, p layers
        ref, _, _ = OFAReference(decomposed.state_dict(), heads=4).encoder(src, images, masks, True, num_layers=p)
        torch.testing.assert_close(limited[:12, :2], ref[:12, :2], atol=1e-5, rtol=0)


def test_text_depth_limit_per_row(decomposed):
    src, lengths, images, masks = _inputs()
    full, _ = _encode(decomposed, src, lengths, images, masks)
    limits = torch.tensor([2, 6, 4])
    limited, depths = _encode(decomposed, src, lengths, images, masks, max_text_depth=limits)
    assert depths[:, 1].tolist() == [2, 6, 4]
    for row, p in enumerate(limits.tolist()):
        by_hand, _ = _encode(_truncated(decomposed, p), src, lengths, images, masks)
        torch.testing.assert_close(limited[12:, row], by_hand[12:, row], atol=1e-6, rtol=0)
    assert torch.equal(limited[:12], full[:12])


def test_depth_limit_of_all_layers_is_no_limit(decomposed, joint):
    src, lengths, images, masks = _inputs()
    for model in (decomposed, joint):
        full, depths = _encode(model, src, lengths, images, masks)
        limited, limited_depths = _encode(model, src, lengths, images, masks, max_image_depth=6, max_text_depth=6)
        assert torch.equal(limited, full)
        assert torch.equal(limited_depths, depths)


def test_joint_and_decomposed_differ(decomposed):
    joint = _micro("joint")
    joint.load_state_dict(decomposed.state_dict())
    src, lengths, images, masks = _inputs()
    prev = torch.tensor([[0, 5, 6], [0, 7, 8], [0, 9, 1]])
    with torch.no_grad():
        a = decomposed(src, lengths, prev, images, masks)[0]
        b = joint(src, lengths, prev, images, masks)[0]
    assert (a - b).abs().max() > 1e-2


def test_image_less_batch(decomposed, joint):
    src, lengths, _, _ = _inputs()
    prev = torch.tensor([[0, 5, 6], [0, 7, 8], [0, 9, 1]])
    for model in (decomposed, joint):
        out, depths = _encode(model, src, lengths, None, None)
        assert out.shape[0] == src.size(1)
        assert depths[:, 0].tolist() == [0, 0, 0]
        with torch.no_grad():
            logits = model(src, lengths, prev)[0]
        assert logits.shape == (3, 3, 44) and torch.isfinite(logits).all()


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(decomposed):
    src, lengths, images, masks = _inputs()
    enc = decomposed.encoder
    with pytest.raises(ValueError, match="empty"):
        enc(src[:, :0], lengths * 0, images, masks)
    all_pad = src.clone()
    all_pad[1] = 1
    with pytest.raises(ValueError, match=r"rows \[1\].*all padding"):
        enc(all_pad, lengths, images, masks)
    with pytest.raises(ValueError, match="patch_images must be"):
        enc(src, lengths, images[:, :1], masks)
    with pytest.raises(ValueError, match="patch_images must be"):
        enc(src, lengths, images[0], masks)
    with pytest.raises(ValueError, match="exceeds the image bucket size 42"):
        enc(src, lengths, torch.zeros(3, 3, 16, 16 * 43), masks)  # a 1 x 43 patch grid


def test_too_long_text_is_a_clear_error(decomposed):
    too_long = torch.full((1, 300), 5)  # micro: --max-source-positions 256 (258 position rows)
    too_long[0, 0], too_long[0, -1] = 0, 2
    with pytest.raises(ValueError, match="max-source-positions 256"):
        decomposed.encoder(too_long, torch.tensor([300]), None, None)
    with pytest.raises(ValueError, match="max-target-positions 256"):
        decomposed(too_long[:, :8], torch.tensor([8]), too_long)


def test_image_batch_size_mismatch_is_a_clear_error(decomposed):
    src, lengths, images, masks = _inputs()
    with pytest.raises(ValueError, match="patch_images"):
        decomposed.encoder(src, lengths, images[:2], masks[:2])
    with pytest.raises(ValueError, match="patch_masks"):
        decomposed.encoder(src, lengths, images, masks[:2])


# ---- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_with_other_vocabulary_is_refused(decomposed):
    other = _micro(n_words=50)
    before = decomposed.encoder.embed_tokens.weight.clone()
    with pytest.raises(CheckpointMismatchError) as err:
        decomposed.load_state_dict(other.state_dict())
    message = str(err.value)
    assert "encoder.embed_tokens.weight" in message and "(54, 128)" in message and "(44, 128)" in message
    assert "vocabulary" in message
    assert torch.equal(decomposed.encoder.embed_tokens.weight, before)  # nothing loaded


def test_checkpoint_missing_a_layer_is_refused(decomposed):
    sd = {k: v for k, v in decomposed.state_dict().items() if not k.startswith("decoder.layers.5.")}
    sd["encoder.layers.6.fc1.weight"] = torch.zeros(512, 128)
    with pytest.raises(CheckpointMismatchError) as err:
        copy.deepcopy(decomposed).load_state_dict(sd)
    message = str(err.value)
    assert "missing" in message and "decoder.layers.5.cross_attn_ln.bias" in message
    assert "unexpected" in message and "encoder.layers.6.fc1.weight" in message


def test_derived_buffers_in_checkpoint_are_ignored(decomposed):
    model = copy.deepcopy(decomposed)
    tables = (model.encoder.token_rp_bucket.clone(), model.encoder.image_rp_bucket.clone(),
              model.decoder.token_rp_bucket.clone())
    sd = dict(model.state_dict())
    sd.update({"encoder.version": torch.tensor([3.0]), "decoder.version": torch.tensor([3.0]),
               "encoder.token_rp_bucket": torch.zeros(1024, 1024, dtype=torch.long),
               "encoder.image_rp_bucket": torch.zeros(1765, 1765, dtype=torch.long),
               "decoder.token_rp_bucket": torch.zeros(1024, 1024, dtype=torch.long),
               "decoder.image_rp_bucket": torch.zeros(1765, 1765, dtype=torch.long),
               "decoder.image_position_idx": torch.zeros(1026, dtype=torch.long)})
    model.load_state_dict(sd)
    assert torch.equal(model.encoder.token_rp_bucket, tables[0])
    assert torch.equal(model.encoder.image_rp_bucket, tables[1])
    assert torch.equal(model.decoder.token_rp_bucket, tables[2])
    src, lengths, images, masks = _inputs()
    assert torch.equal(_encode(model, src, lengths, images, masks)[0],
                       _encode(decomposed, src, lengths, images, masks)[0])


def test_half_precision_model_takes_float32_images(decomposed):
    """fairseq-generate --fp16 halves the model but not the batch: float32 images must still run
    (found on a GPU, where conv2d refused the mix), and match the float32 model closely."""
    src, lengths, images, masks = _inputs()
    prev = torch.zeros(3, 2, dtype=torch.long)
    half = copy.deepcopy(decomposed).to(torch.bfloat16)
    with torch.no_grad():
        got, _ = half(src, lengths, prev, images, masks)
        want, _ = decomposed(src, lengths, prev, images, masks)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
