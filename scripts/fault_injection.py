#!/usr/bin/env python
"""Kill a small fairseq-train run at random moments, resume it each time, and check the result.
The logic is mue.benchmarks.fault_injection (its --help lists the options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this clone's mue
from mue.benchmarks.fault_injection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
