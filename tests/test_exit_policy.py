"""CosineExitPolicy and threshold validation."""
import math

import pytest
import torch

from mue.exiting import CosineExitPolicy, ExitPolicy, validate_threshold


def unit(angle):
    return torch.tensor([math.cos(angle), math.sin(angle)])


def test_similarity_is_mean_of_per_token_cosines():
    # row 0: tokens at angles 0 and 90 degrees from their previous state -> (1 + 0)/2
    # row 1: token with a huge norm does not dominate: cos 1 and cos -1 -> 0
    old = torch.stack([torch.stack([unit(0.0), unit(0.0)]),
                       torch.stack([unit(0.0), 1000 * unit(0.0)])])
    new = torch.stack([torch.stack([unit(0.0), unit(math.pi / 2)]),
                       torch.stack([unit(0.0), -1000 * unit(0.0)])])
    sim = CosineExitPolicy().similarity(new, old)
    assert sim.shape == (2,)
    torch.testing.assert_close(sim, torch.tensor([0.5, 0.0]), atol=1e-6, rtol=0)


def test_padding_is_ignored():
    torch.manual_seed(0)
    old, new = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 1:] = True
    policy = CosineExitPolicy()
    before = policy.similarity(new, old, pad)
    new2, old2 = new.clone(), old.clone()
    new2[pad] = torch.randn(int(pad.sum()), 8) * 50
    old2[pad] = torch.randn(int(pad.sum()), 8)
    after = policy.similarity(new2, old2, pad)
    torch.testing.assert_close(before, after)
    # and the value equals the mean over the kept tokens only
    expected0 = torch.nn.functional.cosine_similarity(new[0, :3], old[0, :3], dim=-1).mean()
    torch.testing.assert_close(before[0], expected0)
    # without the mask the padded row changes
    assert not torch.allclose(policy.similarity(new2, old2)[0], before[0])


def test_time_first_matches_batch_first():
    torch.manual_seed(1)
    old, new = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    pad = torch.tensor([[False, False, True, True], [False] * 4])
    p = CosineExitPolicy()
    bf = p.similarity(new, old, pad)
    tf = p.similarity(new.transpose(0, 1), old.transpose(0, 1), pad, time_first=True)
    torch.testing.assert_close(bf, tf)


def test_all_padding_row_exits_or_raises_in_strict_mode():
    h = torch.randn(2, 3, 4)
    pad = torch.tensor([[True] * 3, [False] * 3])
    sim = CosineExitPolicy().similarity(h, -h, pad)
    assert sim[0].item() == 1.0 and sim[1].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"rows \[0\] contain only padding"):
        CosineExitPolicy(strict=True).similarity(h, -h, pad)


def test_zero_vectors_give_finite_similarity_and_half_precision_works():
    z = torch.zeros(1, 2, 4)
    assert torch.isfinite(CosineExitPolicy().similarity(z, z)).all()
    h = torch.randn(2, 3, 4).half()
    sim = CosineExitPolicy().similarity(h, h)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, torch.ones(2), atol=1e-3, rtol=0)


def test_shape_errors():
    p = CosineExitPolicy()
    with pytest.raises(ValueError, match="same 3-d shape"):
        p.similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="pad_mask shape"):
        p.similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(3, 2, dtype=torch.bool))


def test_exit_exactly_where_similarity_crosses_threshold():
    # crafted rows with known cosines: cos(angle)
    angles = torch.tensor([0.0, 0.3, 0.6, 1.2, math.pi])
    old = torch.stack([unit(0.0) for _ in angles]).unsqueeze(1)
    new = torch.stack([unit(float(a)) for a in angles]).unsqueeze(1)
    p = ExitPolicy()
    sim = p.similarity(new, old)
    torch.testing.assert_close(sim, torch.cos(angles), atol=1e-6, rtol=0)
    thr = math.cos(0.6)  # exactly row 2's similarity (up to float): strict '>' matters
    exits = p.should_exit(sim, thr + 1e-6)
    assert exits.tolist() == [True, True, False, False, False]
    assert p.should_exit(sim, thr - 1e-6).tolist() == [True, True, True, False, False]
    # threshold -1: everything exits except a similarity of exactly -1
    assert p.should_exit(sim, -1.0).tolist() == [True, True, True, True, False]


def test_threshold_one_or_more_never_exits_even_at_similarity_one():
    # similarities computed elsewhere may round a little above 1
    sim = torch.tensor([1.0, 1.0 + 1e-6, 1.0, 1.0])
    p = CosineExitPolicy()
    for thr in (1.0, 1.5, float("inf")):
        assert not p.should_exit(sim, thr).any()
        assert not p.should_exit(sim, torch.full((4,), thr)).any()
    per_row = torch.tensor([0.5, 1.0, 0.99, 2.0])
    assert p.should_exit(sim, per_row).tolist() == [True, False, True, False]
    h = torch.randn(2, 3, 4)
    assert not p.should_exit(p.similarity(h, h.clone()), 1.0).any()


@pytest.mark.parametrize("value, expected", [
    (0.9, 0.9), (1, 1.0), ("0.75", 0.75), (" 1.0 ", 1.0), ("-1", -1.0), ("inf", math.inf), (2.5, 2.5),
])
def test_validate_threshold_accepts(value, expected):
    assert validate_threshold(value, "--img-thres") == expected


@pytest.mark.parametrize("value", ["abc", "", float("nan"), "nan", -1.01, "-inf", None, True, [0.5]])
def test_validate_threshold_rejects_with_option_name(value):
    with pytest.raises(ValueError) as err:
        validate_threshold(value, "--img-thres")
    assert str(err.value) == f"--img-thres must be a number in [-1, inf), got {value!r}"
