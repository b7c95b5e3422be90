#!/usr/bin/env python
"""Reproduce the paper's tables for one task: train MuE and its two ablations, sweep thresholds, report.
The logic is mue.benchmarks.reproduce (its --help lists the steps and options); the hyper-parameters are
mue/recipes.py's."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.reproduce import main  # noqa: E402

if __name__ == "__main__":
    main()
