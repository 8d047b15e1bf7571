"""The command line a benchmark was run with, as its results file quotes it (the thread count included,
since it changes every timing)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def command_line() -> str:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"{threads}python benchmarks/{Path(sys.argv[0]).name} " + " ".join(shlex.quote(x) for x in sys.argv[1:])
