"""Decoder exit threshold as a function of the generation step.

Three kinds:
  * ``constant``:  ``Theta(t) = theta``.
  * ``decay`` (the paper's equation): ``Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N)``,
    t the 0-based step and N = ``max_len``.  Early tokens get a higher threshold
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

from .policy import NEVER_EXIT, validate_threshold

__all__ = ["ThresholdSchedule", "SCHEDULE_KINDS"]

SCHEDULE_KINDS = ("constant", "decay", "reference")


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
        if kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"ThresholdSchedule: kind must be one of {list(SCHEDULE_KINDS)}, got {kind!r}"
            )
        self.kind = kind
        self.theta = validate_threshold(theta, "ThresholdSchedule theta")
        beta, tau = float(beta), float(tau)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ThresholdSchedule: beta must be in [0, 1], got {beta!r}")
        if not (tau >= 0.0 and math.isfinite(tau)):
            raise ValueError(f"ThresholdSchedule: tau must be a finite number >= 0, got {tau!r}")
        self.beta, self.tau = beta, tau
        if kind != "constant" or max_len is not None:
            if max_len is None or isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
                raise ValueError(
                    f"ThresholdSchedule: kind {kind!r} needs an integer max_len >= 1, got {max_len!r}"
                )
            max_len = int(max_len)
        self.max_len = max_len

    @classmethod
    def constant(cls, theta: float) -> "ThresholdSchedule":
        return cls("constant", theta)

    @classmethod
    def decay(cls, theta: float, beta: float = 0.95, tau: float = 1.0, max_len: int = 20) -> "ThresholdSchedule":
        return cls("decay", theta, beta=beta, tau=tau, max_len=max_len)

    @classmethod
    def reference(cls, theta: float, max_len: int) -> "ThresholdSchedule":
        return cls("reference", theta, max_len=max_len)

    @classmethod
    def from_args(cls, kind: str, theta: float, beta: float = 0.95, tau: float = 1.0,
                  max_len: Optional[int] = None) -> "ThresholdSchedule":
        """Build from the task options (``--dec-schedule --dec-thres --dec-decay-beta
        --dec-decay-tau`` and the generation length)."""
        return cls(kind, theta, beta=beta, tau=tau, max_len=max_len)

    @property
    def never_exits(self) -> bool:
        return self.theta >= NEVER_EXIT

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
