"""A progress line per stage of a long job: stage i of n, time elapsed, and an estimate of the time left
from each stage's expected share of the whole (measured once), scaled by how fast this machine has been."""
import time
from typing import Optional, Sequence

PACE_BASIS_S = 60  # expected seconds done before the estimate is scaled by this machine's pace
# a stage done in under this share of its expected time reused earlier outputs: it says nothing of the pace
REUSED_SHARE = 0.05


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s"


class Progress:
    """``begin(title)`` for each of the ``total`` stages, in order. ``expected``: each stage's expected seconds
    (one per stage), for the estimate of the time left; without it only the elapsed time is shown."""

    def __init__(self, total: int, expected: Optional[Sequence[float]] = None, clock=time.monotonic):
        if expected is not None and len(expected) != total:
            raise ValueError(f"{len(expected)} expected durations for {total} stages")
        self.total, self.expected, self.clock = total, expected, clock
        self.start = clock()
        self.done = 0
        self.starts = []  # when each begun stage started

    def pace(self, now: float) -> float:
        """Measured over expected seconds of the finished stages that ran (not reused), once a minute of
        them has been timed (a few seconds of set-up say little about the rest); else 1."""
        ends = self.starts[1:] + [now]
        took = [end - start for start, end in zip(self.starts, ends)]
        ran = [(t, e) for t, e in zip(took, self.expected) if t >= REUSED_SHARE * e]
        spent, behind = sum(t for t, _ in ran), sum(e for _, e in ran)
        return spent / behind if behind >= PACE_BASIS_S and spent > 0 else 1.0

    def line(self, title: str) -> str:
        """The line for starting the next stage (advances the count)."""
        if self.done >= self.total:
            raise ValueError(f"stage {self.done + 1} of {self.total}: more stages than announced")
        now = self.clock()
        text = f"==> stage {self.done + 1} of {self.total}: {title}  (elapsed {_minutes(now - self.start)}"
        if self.expected:
            text += f", about {_minutes(sum(self.expected[self.done:]) * self.pace(now))} left"
        self.starts.append(now)
        self.done += 1
        return text + ")"

    def begin(self, title: str) -> None:
        print("\n" + self.line(title), flush=True)
