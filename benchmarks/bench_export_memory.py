"""Export time and peak memory of a synthetic >= 1B-parameter model at TP=2.

Peak RSS (VmHWM of the exporting process, which runs nothing else) is printed as a ratio to ONE rank's
weight bytes and against the export memory target: 2 GiB + 2x the rank's largest weight tensor (from
`plan`), whatever the model size (tools that load the whole model first need >= 2x the rank's weights).
Real sizes (Llama-3.1-8B shapes at TP=1/2/4): `bench_real_size.py`.

    python benchmarks/bench_export_memory.py [--dim 2048 --layers 20 --vocab 32000 --dtype fp16 --tp 2]
                                             [--record DIR]

--record DIR also writes the table as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import add_record_arguments, table, write_record  # noqa: E402


def _child(ckpt: str, out: str, tp: int, dtype: str) -> None:
    from llama_export.config import Precision
    from llama_export.export.exporter import ExportOptions, export

    def kb(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    base = kb("VmRSS")
    t0 = time.perf_counter()
    export(ExportOptions(checkpoint=Path(ckpt), out=Path(out), tp=tp, dtype=Precision(dtype), progress=False))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": kb("VmHWM") / 1024, "base_mb": base / 1024}))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)  # 1.03B parameters with the other defaults
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--tp", type=int, default=2)
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    import torch

    from llama_export.config import ModelConfig, meta_ffn_hidden_dim
    from llama_export.model.checkpoint import expected_shapes
    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, n_kv_heads=max(1, args.dim // 512),
                      vocab_size=args.vocab, hidden_dim=meta_ffn_hidden_dim(args.dim, 256, None), max_seq_len=2048)
    esize = 4 if args.dtype == "fp32" else 2
    rank_bytes = cfg.num_parameters() * esize / args.tp
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        g = torch.Generator().manual_seed(0)
        state = {n: (torch.randn(s, generator=g) * 0.02).to(torch.float16) for n, s in expected_shapes(cfg).items()}
        save_meta_checkpoint(root / "ckpt", state, to_meta_params(cfg, multiple_of=256))
        del state
        print(f"synthetic model: {cfg.num_parameters() / 1e9:.2f}B parameters, exported as {args.dtype} at "
              f"tp={args.tp}: {rank_bytes / 2**30:.2f} GiB of weights per rank")
        r = subprocess.run([sys.executable, __file__, "--child", str(root / "ckpt"), str(root / "graphs"),
                            str(args.tp), args.dtype], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        if r.returncode:
            print(r.stderr[-3000:])
            raise SystemExit(r.returncode)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in (root / "graphs").rglob("*") if f.is_file())
    from llama_export.config import Precision
    from llama_export.export.sizing import plan_export

    target = plan_export(cfg, tp=args.tp, dtype=Precision(args.dtype)).export_target_bytes
    peak = res["peak_mb"] * 2**20
    print(f"export time: {res['seconds']:.1f} s for {args.tp} ranks ({size / 2**30:.2f} GiB written)")
    verdict = "meets" if peak <= target else "misses"
    print(f"peak RSS: {res['peak_mb']:.0f} MiB (process baseline {res['base_mb']:.0f} MiB) = {peak / rank_bytes:.2f}x one "
          f"rank's weights; target {target / 2**30:.2f} GiB ({verdict})")
    if args.record:
        write_record(args.record, benchmark="bench_export_memory.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"{cfg.num_parameters() / 1e9:.2f}B-parameter model exported {args.dtype} at TP={args.tp}",
                     summary=f"{res['seconds']:.0f} s, peak RSS {res['peak_mb']:.0f} MiB = {peak / rank_bytes:.2f}x one "
                             f"rank's weights; target {target / 2**30:.2f} GiB: {verdict}",
                     tables=[table(["figure", "value"], [
                         ["weights per rank", f"{rank_bytes / 2**30:.2f} GiB"],
                         ["export time", f"{res['seconds']:.1f} s for {args.tp} ranks ({size / 2**30:.2f} GiB written)"],
                         ["peak RSS", (f"{res['peak_mb']:.0f} MiB (process baseline {res['base_mb']:.0f} MiB) = "
                                       f"{peak / rank_bytes:.2f}x one rank's weights")],
                         ["target (2 GiB + 2x the largest tensor)", f"{target / 2**30:.2f} GiB: {verdict}"],
                     ])])


if __name__ == "__main__":
    main()
