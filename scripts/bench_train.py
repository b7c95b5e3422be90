#!/usr/bin/env python
"""Training-step cost of MuE's layer-wise loss against the plain last-layer loss (CPU).
The logic is mue.benchmarks.bench_train (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.bench_train import main  # noqa: E402

if __name__ == "__main__":
    main()
