"""ThresholdSchedule: paper decay, reference variant, never-exit survival, validation."""
import math

import pytest

from mue.exiting import CosineExitPolicy, ThresholdSchedule
import torch


def test_constant():
    s = ThresholdSchedule.constant(0.8)
    assert [s(t) for t in (0, 5, 100)] == [0.8, 0.8, 0.8]


def test_decay_values_at_start_and_end():
    theta, beta, tau, n = 0.9, 0.95, 1.0, 20
    s = ThresholdSchedule.decay(theta, beta, tau, n)
    assert s(0) == pytest.approx(0.95 * 0.9 + 0.05 * 1.0)          # 0.905
    assert s(n) == pytest.approx(0.95 * 0.9 + 0.05 * math.exp(-1))  # ~0.8734
    assert s(10) == pytest.approx(0.855 + 0.05 * math.exp(-0.5))
    values = [s(t) for t in range(n + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    # tau scales the decay
    s2 = ThresholdSchedule("decay", theta, beta=0.5, tau=2.0, max_len=10)
    assert s2(5) == pytest.approx(0.45 + 0.5 * math.exp(-1.0))


def test_reference_variant():
    theta, n = 0.9, 12
    s = ThresholdSchedule.reference(theta, n)
    for t in range(4):  # t < 12/3
        assert s(t) >= 1.0
    assert s(4) == pytest.approx(0.81 + 0.1 * math.exp(-5 / 13))
    assert s(n) == pytest.approx(0.81 + 0.1 * math.exp(-13 / 13))
    # no exits while t < N/3, exits possible afterwards
    p = CosineExitPolicy()
    sim = torch.tensor([0.999])
    assert not p.should_exit(sim, s(3)).any() and p.should_exit(sim, s(4)).all()


@pytest.mark.parametrize("kind", ["constant", "decay", "reference"])
@pytest.mark.parametrize("theta", [1.0, 1.2, math.inf])
def test_theta_one_or_more_never_exits_at_any_step(kind, theta):
    s = ThresholdSchedule(kind, theta, beta=0.5, tau=3.0, max_len=10)
    sim = torch.ones(3)
    for t in range(0, 15):
        assert s(t) >= 1.0
        assert not CosineExitPolicy.should_exit(sim, s(t)).any()


def test_decay_below_one_stays_below_one():
    s = ThresholdSchedule.decay(0.999, beta=0.0, tau=0.0, max_len=5)
    assert s(0) == 1.0  # beta 0, tau 0: exp(0) = 1 -> exactly 1 would disable exits
    s = ThresholdSchedule.decay(0.999, beta=0.01, tau=1.0, max_len=5)
    assert all(s(t) < 1.0 for t in range(10))


def test_from_config_matches_constructor():
    from mue.exiting.config import exit_config

    a = ThresholdSchedule.from_config(exit_config(dec_schedule="decay", dec_thres="0.99", dec_decay_len=16))
    b = ThresholdSchedule.decay(0.99, 0.95, 1.0, 16)
    assert [a(t) for t in range(17)] == [b(t) for t in range(17)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="linear", theta=0.9), "kind must be one of"),
    (dict(kind="decay", theta=0.9, beta=1.5, max_len=5), "beta must be in"),
    (dict(kind="decay", theta=0.9, beta=-0.1, max_len=5), "beta must be in"),
    (dict(kind="decay", theta=0.9, tau=-1.0, max_len=5), "tau must be"),
    (dict(kind="decay", theta=0.9, max_len=None), "needs N, the number of steps"),
    (dict(kind="reference", theta=0.9, max_len=0), r"max_len \(N\) must be an integer >= 1"),
    (dict(kind="decay", theta=0.9, max_len=2.5), r"max_len \(N\) must be an integer >= 1"),
    (dict(kind="constant", theta="abc"), r"theta must be a number in \[-1, inf\)"),
    (dict(kind="constant", theta=-2), r"theta must be a number"),
])
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThresholdSchedule(**kwargs)


def test_invalid_step():
    s = ThresholdSchedule.decay(0.9, max_len=5)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="step must be an integer"):
            s(bad)
