#!/usr/bin/env python
"""Training-step cost of DistributedDataParallel with and without find_unused_parameters (CPU, gloo).
The logic is mue.benchmarks.bench_ddp (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.bench_ddp import main  # noqa: E402

if __name__ == "__main__":
    main()
