"""Benchmark entrypoint: the same as ``segpipe bench`` (see segpipe/tools/benchmark.py).

.venv/bin/python jobs/benchmark.py --json bench.json            # CPU defaults
python jobs/benchmark.py --device cuda --images 64 --batch-size 8 --width 1066 --height 800
"""

from __future__ import annotations

import sys

from segpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
