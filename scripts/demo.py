#!/usr/bin/env python
"""The main job (`make demo`): MuE on the built-in synthetic scenes, end to end, on a CPU; results in
results/demo/. The logic is mue.benchmarks.demo (its --help lists the steps and options)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this clone's mue
from mue.benchmarks.demo import main  # noqa: E402

if __name__ == "__main__":
    main(root=ROOT)
