#!/usr/bin/env python
"""How well each decoder layer answers: per-layer validation accuracy and loss of trained checkpoints.
The logic is mue.benchmarks.layer_quality (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.layer_quality import main  # noqa: E402

if __name__ == "__main__":
    main()
