#!/usr/bin/env python
"""MuE against other exit methods and a smaller model, in one harness (captioning or SNLI-VE).
The logic is mue.benchmarks.compare_baselines (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.compare_baselines import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
