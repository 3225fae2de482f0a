#!/usr/bin/env python3
"""Checkpoint benchmark: s3ckptfs against the usual ways of getting torch checkpoints into and out of S3.

The code is the ``ckptbench`` package beside this file; docs/benchmark.md says
what it measures and how to read the results. ``scripts/bench.sh`` installs the
peers, then runs this with the same arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.cli import main  # noqa: E402  (found through the path set just above)

if __name__ == "__main__":
    sys.exit(main())
