"""The TensorRT backend: plugins (Triton kernels), engine build, and the engine runner.

Where things live:
    kernels.py     Triton RMSNorm / RoPE kernels and their launch plans (runs under TRITON_INTERPRET)
    aot.py         PTX compilation of those kernels for sm_80 / sm_90, without a GPU
    plugins.py     tensorrt.plugin registrations (AOT PTX + JIT fallback)
    lowering.py    ONNX pass: custom nodes -> TensorRT plugin nodes
    profiles.py    prefill / decode optimization profiles from symbolic input shapes
    structure.py   "same structure" key so identical layer segments are built once and refit
    build.py       build_engines(): per-rank engines + build_manifest.json
    runner.py      TensorRTBackend: the RankBackend over those engines

Importing this package imports neither tensorrt nor triton; `add_build_arguments` / `run_build` are the
CLI hooks for `llama-export build`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llama-export build`."""
    parser.add_argument("--artifacts", type=Path, required=True,
                        help="export directory with manifest.json (graphs/<model>/<variant>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="engine directory (default: engines/<model_name>/<variant> from the manifest)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="ranks to build (default: all)")
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="build every layer segment from scratch instead of refitting one engine per kind")
    parser.add_argument("--jit-plugins", dest="aot_plugins", action="store_false",
                        help="run the plugins' Python (JIT) implementation instead of the AOT PTX")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit in GiB")
    parser.add_argument("--timing-cache", type=Path, default=None,
                        help="timing cache to start from (default: the one in --out, if any)")


def run_build(args: argparse.Namespace) -> int:
    """Build engines as `args` say; returns the exit code. Raises BackendUnavailableError without TensorRT."""
    from llama_export.backends.tensorrt.plugins import import_tensorrt

    import_tensorrt()  # fail before reading anything, with the install hint
    from llama_export.backends.tensorrt.build import build_engines, default_out_dir
    from llama_export.export.manifest import load_manifest

    out = args.out
    if out is None:
        out = default_out_dir(load_manifest(args.artifacts, verify_hashes=False))
    build_engines(
        args.artifacts, out, ranks=args.ranks, refit=args.refit, aot_plugins=args.aot_plugins,
        workspace_gib=args.workspace_gib, timing_cache=args.timing_cache,
    )
    log.info("engines written to %s", out)
    return 0
