"""Prefill latency and decode tokens/s: eager PyTorch vs our ONNX Runtime graphs, TP=1 and TP=2.

One invocation builds a synthetic checkpoint (default ~130M parameters, fp32), exports it at TP=1 and
TP=2, then times `llama-export run` for every (backend, tp) on the same weights and the same prompt.
Times are measured inside the rank processes (loading excluded). The decode bound is the weight bytes
one rank reads per token over the measured memory bandwidth (a large tensor copy, read + write bytes
per second), so decode speed can be read as a fraction of the machine's limit.

    python benchmarks/bench_generate.py [--dim 768 --layers 12 --vocab 32000 --prompt 128 --new 128]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    add_model_arguments,
    add_record_arguments,
    copy_bandwidth,
    model_config,
    random_state,
    table,
    write_record,
)


def run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "llama_export.cli", "run", *args, "--json", str(out)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    (batch,) = json.loads(out.read_text())["batches"]  # one --prompt-ids batch
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    import torch

    from llama_export.export.exporter import ExportOptions, export
    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    cfg = model_config(args, max_seq_len=args.prompt + args.new + 8)
    bw = copy_bandwidth()
    print(f"model: {cfg.num_parameters() / 1e6:.0f}M parameters fp32; batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens; torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    print(f"memory bandwidth (tensor copy, read+write): {bw / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_meta_checkpoint(root / "ckpt", random_state(cfg), to_meta_params(cfg, multiple_of=256))
        weight_bytes = cfg.num_parameters() * 4
        prompt = ",".join(str(i % cfg.vocab_size) for i in range(1, args.prompt + 1))
        common = ["--prompt-ids", prompt, "--max-new-tokens", str(args.new)]
        rows = []
        for tp in args.tp:
            t0 = time.perf_counter()
            path = export(ExportOptions(checkpoint=root / "ckpt", out=root / "graphs", tp=tp, progress=False))
            print(f"exported tp={tp} in {time.perf_counter() - t0:.1f} s")
            eager = run(["--checkpoint", str(root / "ckpt"), "--tp", str(tp), *common], root / f"e{tp}.json")
            ort = run(["--artifacts", str(path), "--backend", "ort", "--tp", str(tp), *common], root / f"o{tp}.json")
            assert eager["tokens"] == ort["tokens"], "eager and ORT disagree on greedy tokens"
            bound = bw / (weight_bytes / tp)  # tokens/s if every weight byte of a rank is read once per token
            for name, r in (("eager", eager), ("ort", ort)):
                rows.append((tp, name, r["prefill_s"] * 1e3, (args.new - 1) / r["decode_s"], bound))
    print(f"\n{'tp':>2} {'backend':<7} {'prefill ms':>10} {'decode tok/s':>12} {'vs eager':>8} {'of bound':>8}")
    cells = []
    for tp, name, pre, dec, bound in rows:
        base = next(d for t, n, _, d, _ in rows if t == tp and n == "eager")
        base_pre = next(p for t, n, p, _, _ in rows if t == tp and n == "eager")
        print(f"{tp:>2} {name:<7} {pre:10.1f} {dec:12.1f} {dec / base:7.2f}x {dec / bound:7.0%}"
              f"   (prefill {base_pre / pre:.2f}x eager)")
        cells.append([tp, name, round(pre, 1), round(dec, 1), f"{dec / base:.2f}x", f"{dec / bound:.0%}",
                      f"{base_pre / pre:.2f}x"])
    print(f"decode bound at tp=1: {rows[0][4]:.1f} tok/s (weights {weight_bytes / 2**20:.0f} MiB per token)")
    if args.record:
        ort1 = next((c for c in cells if c[0] == args.tp[0] and c[1] == "ort"), None)
        write_record(args.record, benchmark="bench_generate.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"{cfg.num_parameters() / 1e6:.0f}M fp32 model, prompt {args.prompt} -> {args.new} new, "
                           f"batch 1: eager vs ONNX Runtime, TP={'/'.join(map(str, args.tp))}",
                     summary=(f"ORT TP={ort1[0]} decode {ort1[3]} tok/s = {ort1[4]} eager, {ort1[5]} of the bandwidth "
                              f"bound; prefill {ort1[6]} eager") if ort1 else "",
                     tables=[table(["tp", "backend", "prefill ms", "decode tok/s", "vs eager", "of bound",
                                    "prefill vs eager"], cells,
                                   title=f"memory bandwidth (tensor copy) {bw / 1e9:.1f} GB/s; decode bound at tp=1 "
                                         f"{rows[0][4]:.1f} tok/s")])


if __name__ == "__main__":
    main()
