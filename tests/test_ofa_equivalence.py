"""mue's model computes what OFA computes: logits against tests/ofa_reference.py (a literal, independent
re-implementation of OFA's forward pass) on a tiny random model, and the image stem against torchvision."""
import pytest
import torch
from torchvision.models.resnet import Bottleneck, ResNet

from mue.models import build_arch
from ofa_reference import OFAReference, randomize_, tiny_dictionary

ATOL = 1e-5


def _model(mode):
    torch.manual_seed(0)
    model = build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), encoder_mode=mode, dropout=0.0)
    return randomize_(model, seed=1).eval()


@pytest.fixture(scope="module")
def joint():
    return _model("joint")


@pytest.fixture(scope="module")
def decomposed():
    return _model("decomposed")


def _reference(model):
    return OFAReference(model.state_dict(), heads=model.encoder.heads, padding_idx=1)


def _batch(n_text=7, n_tgt=5, image_hw=(64, 48), seed=2):
    """Three rows: full, text and target padded, no image (patch_masks False)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 44, (3, n_text), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[1, -3:] = 1  # padded text
    src[1, -4] = 2
    prev = torch.randint(4, 44, (3, n_tgt), generator=g)
    prev[:, 0] = 0
    prev[2, -2:] = 1  # padded target
    images = torch.randn(3, 3, *image_hw, generator=g)
    masks = torch.tensor([True, True, False])
    return dict(src_tokens=src, src_lengths=src.ne(1).sum(1), prev_output_tokens=prev, patch_images=images,
                patch_masks=masks)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


def _ref_logits(model, batch, decomposed=False):
    return _reference(model)(batch["src_tokens"], batch["prev_output_tokens"], batch["patch_images"],
                             batch["patch_masks"], decomposed=decomposed)


def test_embeddings_are_tied(joint):
    assert joint.decoder.output_projection.weight is joint.encoder.embed_tokens.weight
    assert joint.decoder.embed_tokens.weight is joint.encoder.embed_tokens.weight


def test_joint_logits_equal_ofa_reference(joint):
    batch = _batch()
    ours, ref = _logits(joint, batch), _ref_logits(joint, batch)
    assert ours.shape == ref.shape == (3, 5, 44)
    assert ref.abs().max() > 1.0  # the check is not vacuous
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_joint_logits_equal_reference_without_images(joint):
    batch = dict(_batch(), patch_images=None, patch_masks=None)
    torch.testing.assert_close(_logits(joint, batch), _ref_logits(joint, batch), atol=ATOL, rtol=0)


def test_decomposed_logits_equal_reference_with_cross_modal_attention_blocked(decomposed):
    batch = _batch()
    ref = _ref_logits(decomposed, batch, decomposed=True)
    torch.testing.assert_close(_logits(decomposed, batch), ref, atol=ATOL, rtol=0)
    # and the block matters: the joint computation with the same weights is different
    assert (ref - _ref_logits(decomposed, batch)).abs().max() > 1e-2


def test_each_randomised_part_matters(joint):
    """Guards the reference comparison: perturbing any of these changes OFA's logits."""
    batch = _batch()
    base = _ref_logits(joint, batch)
    sd = joint.state_dict()
    g = torch.Generator().manual_seed(5)
    for name in ("encoder.layers.0.self_attn.c_attn", "encoder.layers.1.attn_ln.bias",
                 "encoder.token_rel_pos_table_list.2.weight", "encoder.image_rel_pos_table_list.3.weight",
                 "encoder.type_embedding.weight", "encoder.pos_ln.weight", "encoder.image_pos_ln.bias",
                 "encoder.patch_layernorm_embedding.weight", "decoder.layers.0.encoder_attn.c_attn",
                 "decoder.token_rel_pos_table_list.1.weight", "decoder.cross_pos_k_linear.weight",
                 "decoder.layers.2.ffn_layernorm.bias", "encoder.embed_images.layer1.0.bn2.running_mean"):
        changed = dict(sd)  # random, not uniform: a uniform shift before a LayerNorm is invisible
        changed[name] = sd[name] + 0.3 * torch.randn(sd[name].shape, generator=g)
        other = OFAReference(changed, heads=joint.encoder.heads)(
            batch["src_tokens"], batch["prev_output_tokens"], batch["patch_images"], batch["patch_masks"])
        assert (other - base).abs().max() > 1e-3, name


def test_long_text_uses_ofa_log_buckets(joint):
    """Text longer than token_bucket_size/2 (128) reaches OFA's log-spaced buckets, which OFA always
    builds for 1024 positions (make_token_bucket_position's default), whatever --max-source-positions
    or --max-target-positions (the micro arch sets both to 256). Same for the decoder's 140 targets."""
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 44, (1, 150), generator=g)
    src[0, 0], src[0, -1] = 0, 2
    prev = torch.randint(4, 44, (1, 140), generator=g)
    prev[0, 0] = 0
    batch = dict(src_tokens=src, src_lengths=torch.tensor([150]), prev_output_tokens=prev,
                 patch_images=None, patch_masks=None)
    torch.testing.assert_close(_logits(joint, batch), _ref_logits(joint, batch), atol=ATOL, rtol=0)


def test_resnet_stem_equals_torchvision(joint):
    stem = joint.encoder.embed_images
    blocks = [len(stem.layer1), len(stem.layer2), len(stem.layer3)]
    tv = ResNet(Bottleneck, blocks + [1])
    missing, unexpected = tv.load_state_dict(stem.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("layer4.", "fc.")) for k in missing)
    tv.eval()
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(images))))
        expected = tv.layer3(tv.layer2(tv.layer1(x)))
        ours = stem(images)
    assert ours.shape == (2, 1024, 4, 5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # the literal reference's stem agrees too
    torch.testing.assert_close(_reference(joint).resnet(images), expected, atol=1e-4, rtol=1e-5)


def test_attn_scale_factor_option_is_honoured():
    """OFA scales attention and position bias alike by (head_dim * attn_scale_factor) ** -0.5."""
    torch.manual_seed(0)
    model = build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), encoder_mode="joint", dropout=0.0,
                       attn_scale_factor=1.0)
    model = randomize_(model, seed=1).eval()
    batch = _batch()
    ref = OFAReference(model.state_dict(), heads=4, attn_scale_factor=1.0)(
        batch["src_tokens"], batch["prev_output_tokens"], batch["patch_images"], batch["patch_masks"])
    torch.testing.assert_close(_logits(model, batch), ref, atol=ATOL, rtol=0)
