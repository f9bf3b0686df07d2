#!/usr/bin/env python3
"""The main job: `python export.py [options]` is `llama-export export [options]`.

With no arguments it exports the built-in demo model at TP=1 and TP=2 into graphs/, validates every
rank on ONNX Runtime (CPU) against the eager model and prints a table; see `--help`.
"""

import sys

from llama_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
