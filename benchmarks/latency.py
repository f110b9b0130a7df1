"""Latency benchmark of a camera config; same as ``inspector bench``.

    python benchmarks/latency.py --config configs/demo.yaml --frames 200 --out bench-out
"""

import sys

from inspector.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
