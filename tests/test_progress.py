"""mue.benchmarks.progress: stage i of n, elapsed time, and the time left scaled by this machine's pace."""
import pytest

from mue.benchmarks.demo import EXPECTED_SECONDS, TASK_ORDER
from mue.benchmarks.progress import Progress
from mue.benchmarks.reproduce import TASK_STAGES


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_count_stages_and_scale_the_estimate_by_the_pace():
    clock = Clock()
    p = Progress(3, expected=[60, 120, 60], clock=clock)
    assert p.line("data") == "==> stage 1 of 3: data  (elapsed 0 min 00 s, about 4 min 00 s left)"
    clock.now += 120  # the first stage took twice as long as measured: the rest is expected to as well
    assert p.line("train") == "==> stage 2 of 3: train  (elapsed 2 min 00 s, about 6 min 00 s left)"
    clock.now += 60  # now 180 s for 180 expected: on pace
    assert p.line("report") == "==> stage 3 of 3: report  (elapsed 3 min 00 s, about 1 min 00 s left)"
    with pytest.raises(ValueError, match="more stages than announced"):
        p.line("extra")


def test_a_short_first_stage_does_not_set_the_pace():
    clock = Clock()
    p = Progress(2, expected=[10, 600], clock=clock)
    p.line("data")
    clock.now += 5  # twice as fast as measured, over 10 s: too little to scale 10 minutes by
    assert p.line("train") == "==> stage 2 of 2: train  (elapsed 0 min 05 s, about 10 min 00 s left)"


def test_reused_stages_do_not_set_the_pace():
    clock = Clock()
    p = Progress(4, expected=[10, 500, 200, 100], clock=clock)
    p.line("data")
    clock.now += 0.2  # data and training reused (a second run after deleting the evaluations)
    p.line("train")
    clock.now += 2
    assert p.line("evaluate") == "==> stage 3 of 4: evaluate  (elapsed 0 min 02 s, about 5 min 00 s left)"
    clock.now += 400  # evaluation ran, twice as slow as measured: the rest is expected to as well
    assert p.line("report") == "==> stage 4 of 4: report  (elapsed 6 min 42 s, about 3 min 20 s left)"


def test_without_expected_durations_only_elapsed_is_shown():
    clock = Clock()
    p = Progress(2, clock=clock)
    clock.now += 75
    assert p.line("x") == "==> stage 1 of 2: x  (elapsed 1 min 15 s)"
    with pytest.raises(ValueError, match="2 expected durations for 3 stages"):
        Progress(3, expected=[1, 2])


def test_the_demo_expects_every_stage_it_runs():
    assert len(EXPECTED_SECONDS) == TASK_STAGES * len(TASK_ORDER) + 1
