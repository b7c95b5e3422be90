#!/usr/bin/env python
"""Inference benchmark of MuE's early exits on random-weight mue_ofa models (CPU, or a GPU with --device cuda).
The logic is mue.benchmarks.bench_inference (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.bench_inference import main  # noqa: E402

if __name__ == "__main__":
    main()
