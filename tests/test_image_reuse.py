"""Each image encoded once: rows that share an image share one run of the image stream (exactly), evaluation
groups the pairs of an image into the same batch, and a bounded cache serves images seen before."""
import json

import numpy as np
import pytest
import torch

from mue.exiting.accounting import account, model_sizes, new_stats
from mue.exiting.config import exit_config
from mue.exiting.session import exit_session
from mue.models import build_arch
from mue.models import image_reuse
from mue.models.image_reuse import ImageStreamCache, image_groups
from ofa_reference import randomize_, tiny_dictionary

EXITS = dict(img_thres=0.9, txt_thres=0.9, dec_thres=0.9)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_arch("mue_ofa_micro", dictionary=tiny_dictionary(), dropout=0.0), seed=1).eval()


def _batch(image_of_row=(0, 1, 0, 0, 2, 1), seed=0):
    """Rows asking different questions about a few images (row i shows image image_of_row[i])."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(max(image_of_row) + 1, 3, 48, 48, generator=g)
    src = torch.randint(4, 44, (len(image_of_row), 7), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[1, -2:], src[1, -3] = 1, 2  # a padded row
    return src, images[list(image_of_row)], [f"img{i}" for i in image_of_row]


def test_image_groups_by_key_by_pixels_and_never_for_rows_without_an_image():
    _, images, keys = _batch()
    with_image = torch.ones(6, dtype=torch.bool)
    for key_arg in (keys, None):
        first, inverse = image_groups(images, with_image, key_arg)
        assert first.tolist() == [0, 1, 4] and inverse.tolist() == [0, 1, 0, 0, 2, 1]
    with_image[2] = False  # a row without an image (zeros, as the collater gives) stays alone
    first, inverse = image_groups(images, with_image, keys)
    assert inverse[2] not in inverse[[0, 3]] and inverse[0] == inverse[3]
    assert image_groups(images[[0, 1, 4]], torch.ones(3, dtype=torch.bool)) is None  # nothing shared
    assert image_groups(images[:1], torch.ones(1, dtype=torch.bool)) is None


def test_pixel_groups_survive_collisions_of_the_hash(monkeypatch):
    """The hash only proposes groups: distinct images that collide in it are told apart exactly."""
    _, images, _ = _batch()
    monkeypatch.setattr(image_reuse, "_projection", lambda size, device: torch.zeros(size, dtype=torch.long))
    first, inverse = image_groups(images, torch.ones(6, dtype=torch.bool))
    assert inverse.tolist() == [0, 1, 0, 0, 2, 3]  # 1 and 5 share pixels but land after a collision: apart


def _encode(model, src, images, keys, config, image_cache=None):
    with torch.no_grad(), exit_session(model, config, image_cache=image_cache) as settings:
        out = model.encoder(src, None, images, None, image_keys=keys)
    return out, settings.trace


@pytest.mark.parametrize("exits", [{}, EXITS])
def test_shared_images_change_nothing(model, monkeypatch, exits):
    """Reuse is exact: bit for bit the same batch with every row running its own image. Against each row
    alone the batch agrees to float rounding only, with or without reuse (CPU kernels sum in an order that
    depends on the batch's shape: 2e-6 here, also without reuse)."""
    import mue.models.encoder as encoder_module

    src, images, keys = _batch()
    config = exit_config(**exits)
    with monkeypatch.context() as patched:
        patched.setattr(encoder_module, "image_groups", lambda *args: None)
        own, trace = _encode(model, src, images, keys, config)
    assert trace.encoder[0].encoded.all()
    for key_arg in (keys, None):  # by image id, and by pixels
        out, trace = _encode(model, src, images, key_arg, config)
        assert trace.encoder[0].encoded.tolist() == [True, True, False, False, True, False]
        assert torch.equal(out["encoder_out"][0], own["encoder_out"][0])
        assert torch.equal(out["exit_depths"][0], own["exit_depths"][0])
    for row in range(6):
        length = int(src[row].ne(1).sum())
        alone, _ = _encode(model, src[row:row + 1, :length], images[row:row + 1], None, config)
        n = alone["encoder_out"][0].size(0)
        torch.testing.assert_close(out["encoder_out"][0][:n, row], alone["encoder_out"][0][:, 0], atol=1e-5, rtol=0)
        assert torch.equal(out["exit_depths"][0][row], alone["exit_depths"][0][0])
    if exits:
        assert out["exit_depths"][0][:, 0].min() < 6  # exits happened


def test_answers_with_shared_images_equal_the_unshared_ones(model, monkeypatch):
    """The whole SNLI-VE scoring path, with exits: the same scores bit for bit with and without reuse."""
    import mue.models.encoder as encoder_module
    from mue.tasks.snli_ve import score_candidates

    src, images, keys = _batch()
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(1).sum(1), "patch_images": images,
                            "patch_masks": torch.ones(6, dtype=torch.bool), "image_keys": keys}}
    candidates = [torch.tensor([5, 2]), torch.tensor([6, 2]), torch.tensor([7, 8, 2])]
    scores = {}
    for reuse in (True, False):
        with monkeypatch.context() as patched:
            if not reuse:
                patched.setattr(encoder_module, "image_groups", lambda *args: None)
            with torch.no_grad(), exit_session(model, exit_config(**EXITS)):
                scores[reuse] = score_candidates(model, sample, candidates)
    assert torch.equal(scores[True], scores[False])


def test_reuse_is_counted_and_eq14_stays_per_sample(model):
    src, images, keys = _batch()
    _, trace = _encode(model, src, images, keys, exit_config())
    summary = account(new_stats(model), trace, model_sizes(model)).summary()
    assert (summary["image_rows"], summary["images_encoded"], summary["image_reuse"]) == (6, 3, 2.0)
    assert summary["n_samples"] == 6 and summary["mean_image_layers"] == 6  # every row keeps its depth
    stem = summary["flops_by_component"]["resnet_stem"]
    assert stem["spent"] == stem["full"] and summary["flops_full_without_reuse"] > summary["flops_full"]
    _, alone = _encode(model, src[:1], images[:1], None, exit_config())
    one = account(new_stats(model), alone, model_sizes(model)).summary()
    assert stem["spent"] == pytest.approx(3 * one["flops_by_component"]["resnet_stem"]["spent"])


def test_the_cache_serves_images_seen_before_and_only_under_the_same_settings(model):
    src, images, keys = _batch()
    cache = ImageStreamCache(max_images=8)
    first, _ = _encode(model, src, images, keys, exit_config(**EXITS), cache)
    again, trace = _encode(model, src, images, keys, exit_config(**EXITS), cache)
    assert not trace.encoder[0].encoded.any() and cache.hits == 3 and len(cache) == 3
    assert torch.equal(again["encoder_out"][0], first["encoder_out"][0])
    _, trace = _encode(model, src, images, keys, exit_config(), cache)  # other image-stream settings: a miss
    assert trace.encoder[0].encoded.sum() == 3
    small = ImageStreamCache(max_images=2)
    _encode(model, src, images, keys, exit_config(), small)
    assert len(small) == 2  # least recently used first out
    with pytest.raises(ValueError, match="max_images"):
        ImageStreamCache(-1)


def test_grouped_evaluation_orders_pairs_by_image_and_keeps_every_example(tmp_path):
    from mue.data.datasets import SnliVeDataset
    from mue.data.readers import OfaSnliVeTsv
    from mue.data.synthetic import generate
    from mue.tasks.snli_ve import SnliVeTask  # noqa: F401  (registers the task)
    from mue.data.dictionary import build_ofa_dictionary
    from mue.data.tokenizer import Tokenizer

    paths = generate(str(tmp_path), num_train=2, num_valid=4, num_test=2, image_size=32)
    reader = OfaSnliVeTsv(paths["valid"]["snli_ve"])
    # shuffle the file's rows so the pairs of an image are apart
    lines = open(paths["valid"]["snli_ve"]).read().splitlines()
    order = np.random.default_rng(0).permutation(len(lines))
    shuffled = tmp_path / "shuffled.tsv"
    shuffled.write_text("\n".join(lines[i] for i in order) + "\n")
    reader = OfaSnliVeTsv(str(shuffled))
    dictionary = build_ofa_dictionary(paths["dict"], 0, 0)
    kwargs = dict(patch_image_size=32)
    grouped = SnliVeDataset("valid", reader, dictionary, Tokenizer(), group_by_image=True, **kwargs)
    plain = SnliVeDataset("valid", reader, dictionary, Tokenizer(), group_by_image=False, **kwargs)
    indices = grouped.ordered_indices()
    assert sorted(indices.tolist()) == list(range(len(reader))) == plain.ordered_indices().tolist()
    ids = [reader.image_id(i) for i in indices]
    assert all(ids.count(i) == 3 for i in set(ids))  # three hypotheses per synthetic image
    assert [ids[k] for k in range(0, len(ids), 3)] == [ids[k + 2] for k in range(0, len(ids), 3)]  # adjacent
    batch = grouped.collater([grouped[i] for i in indices[:6]])
    assert batch["net_input"]["image_keys"] == ids[:6]


def test_file_order_is_the_flag_users_type():
    """SNLI-VE groups pairs by image unless `--no-group-by-image` is given (fairseq makes a bool field that
    defaults to True a flag that turns it off, so the option is a negative one)."""
    from fairseq import options

    import mue  # noqa: F401  (registers the task)

    def parsed(*extra):
        return options.parse_args_and_arch(options.get_generation_parser(),
                                           ["data", "--task", "mue_snli_ve", *extra])

    assert parsed().no_group_by_image is False
    assert parsed("--no-group-by-image").no_group_by_image is True
