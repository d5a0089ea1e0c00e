"""Core attention benchmark (same as `attnlab bench`): JSON lines, anchors in the same run.

python benchmarks/bench_core.py --smoke
python benchmarks/bench_core.py --cases window --n 16384 --flex
"""

from __future__ import annotations

import sys

from attnlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
