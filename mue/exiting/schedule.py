"""Decoder exit threshold as a function of the generation step.

Three kinds:
  * ``constant``:  ``Theta(t) = theta``.
  * ``decay`` (the paper's equation): ``Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N)``,
    t the 0-based step and N = ``max_len`` (``--dec-decay-len``: a fixed setting, never derived
    from a batch, so a row's thresholds do not depend on its batch mates).  Early tokens get a higher threshold
    (exit later, they condition everything that follows); later ones a lower one.
  * ``reference``: what the public MuE code does, kept for comparison: no exits
    for the first third of the output (``t < N/3`` returns ``NEVER_EXIT``), then
    ``0.9*theta + 0.1*exp(-(t+1)/(N+1))``.

``theta >= 1`` means "never exit" and must survive the decay (``beta*1 + (1-beta)*e^-x``
is < 1 for t > 0): for such theta every kind returns ``theta`` at every step.
For theta < 1 and beta > 0 the decayed value stays < 1 (its largest value, at
t = 0, is ``1 - beta*(1-theta)``); with beta = 0 the first step gets exactly 1,
i.e. no exit at t = 0, which is what the equation says.
"""
import math
from typing import Optional

from .config import (DEFAULT_DECAY_LEN, NEVER_EXIT, SCHEDULE_KINDS, never_exits, validate_choice, validate_count,
                     validate_fraction, validate_rate, validate_threshold)

__all__ = ["ThresholdSchedule", "SCHEDULE_KINDS"]


class ThresholdSchedule:
    """``schedule(step) -> float``: the decoder exit threshold at ``step`` (0-based).

    Args:
        kind: one of ``constant``, ``decay``, ``reference``.
        theta: base threshold, in [-1, inf) (>= 1 disables exiting).
        beta: weight of theta in ``decay``, in [0, 1].
        tau: decay rate in ``decay``, >= 0.
        max_len: N, the maximum number of steps (>= 1); required by ``decay``
            and ``reference``.
    """

    def __init__(
        self,
        kind: str = "constant",
        theta: float = 1.0,
        beta: float = 0.95,
        tau: float = 1.0,
        max_len: Optional[int] = None,
    ):
        self.kind = validate_choice(kind, "ThresholdSchedule kind", SCHEDULE_KINDS)
        self.theta = validate_threshold(theta, "ThresholdSchedule theta")
        self.beta = validate_fraction(beta, "ThresholdSchedule beta")
        self.tau = validate_rate(tau, "ThresholdSchedule tau")
        if kind != "constant" and max_len is None:
            raise ValueError(f"ThresholdSchedule: kind {kind!r} needs N, the number of steps (max_len)")
        self.max_len = None if max_len is None else validate_count(max_len, "ThresholdSchedule max_len (N)", 1)

    @classmethod
    def constant(cls, theta: float) -> "ThresholdSchedule":
        return cls("constant", theta)

    @classmethod
    def decay(cls, theta: float, beta: float = 0.95, tau: float = 1.0, max_len: int = DEFAULT_DECAY_LEN) -> "ThresholdSchedule":
        return cls("decay", theta, beta=beta, tau=tau, max_len=max_len)

    @classmethod
    def reference(cls, theta: float, max_len: int) -> "ThresholdSchedule":
        return cls("reference", theta, max_len=max_len)

    @classmethod
    def from_config(cls, config) -> "ThresholdSchedule":
        """The decoder schedule of an ExitConfig (--dec-schedule, --dec-thres, --dec-decay-beta/-tau/-len)."""
        return cls(config.dec_schedule, config.dec_thres, beta=config.dec_decay_beta, tau=config.dec_decay_tau,
                   max_len=config.dec_decay_len)

    @property
    def never_exits(self) -> bool:
        return never_exits(self.theta)

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"ThresholdSchedule: step must be an integer >= 0, got {step!r}")
        if self.kind == "constant" or self.never_exits:
            return self.theta
        t, n = int(step), self.max_len
        if self.kind == "decay":
            return self.beta * self.theta + (1.0 - self.beta) * math.exp(-self.tau * t / n)
        # reference
        if t < n / 3.0:
            return NEVER_EXIT
        return 0.9 * self.theta + 0.1 * math.exp(-(t + 1) / (n + 1))

    def __repr__(self):
        return (f"ThresholdSchedule(kind={self.kind!r}, theta={self.theta}, beta={self.beta}, "
                f"tau={self.tau}, max_len={self.max_len})")
