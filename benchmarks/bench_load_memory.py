"""Peak memory of loading ONE rank of a synthetic checkpoint, TP=1 vs TP=4, as ratios.

Each load runs in a fresh process; memory is the growth of peak RSS (VmHWM, which also counts touched
pages of memory-mapped files; `ru_maxrss` would inherit the parent's peak across exec) over the
process's RSS right before the load, and the peak of
anonymous memory (RssAnon, sampled every 2 ms). Target: a TP=4 rank <= 0.35x of TP=1.

    python benchmarks/bench_load_memory.py [--dim 2048 --layers 8 --vocab 32000] [--formats meta hf]
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import add_record_arguments, table, write_record  # noqa: E402


def _child(path: str, tp: int) -> None:
    import torch

    from llama_export.model.checkpoint import load_config, load_rank_state
    from llama_export.parallel.plan import RankShape

    def status_kb(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def rss_anon_kb() -> int:
        return status_kb("RssAnon")

    cfg = load_config(Path(path))
    base_max = status_kb("VmRSS")
    base_anon = rss_anon_kb()
    peak_anon = [base_anon]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], rss_anon_kb())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    state = load_rank_state(Path(path), RankShape(cfg, tp, 0), dtype=torch.float16)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    peak_max = status_kb("VmHWM")
    print(json.dumps({"rss_mb": (peak_max - base_max) / 1024, "anon_mb": (peak_anon[0] - base_anon) / 1024,
                      "weights_mb": nbytes / 2**20, "seconds": dt}))


def _measure(path: Path, tp: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tp)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(root: Path, dim: int, layers: int, vocab: int) -> dict[str, Path]:
    import torch

    from llama_export.config import ModelConfig
    from llama_export.model.checkpoint import expected_shapes
    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=dim // 128, n_kv_heads=max(1, dim // 512),
                      vocab_size=vocab, hidden_dim=0 or _hidden(dim), max_seq_len=4096)
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.float16)
             for n, s in expected_shapes(cfg).items()}
    meta = root / "meta"
    save_meta_checkpoint(meta, state, to_meta_params(cfg, multiple_of=256))
    hf = root / "hf"
    hf.mkdir()
    from safetensors.torch import save_file

    from llama_export.model.hf_format import hf_name, interleaved_to_rotate_half

    hf_state = {}
    for n, t in state.items():
        if n.endswith(("wq.weight", "wk.weight")):
            t = interleaved_to_rotate_half(t, cfg.head_dim)
        hf_state[hf_name(n)] = t.contiguous()
    save_file(hf_state, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "intermediate_size": cfg.hidden_dim,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len}))
    print(f"synthetic checkpoint: {cfg.num_parameters() / 1e6:.0f}M parameters, fp16 "
          f"({sum(t.numel() * 2 for t in state.values()) / 2**20:.0f} MiB)")
    return {"meta": meta, "hf": hf}


def _hidden(dim: int) -> int:
    from llama_export.config import meta_ffn_hidden_dim

    return meta_ffn_hidden_dim(dim, 256, None)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--formats", nargs="+", default=["meta", "hf"], choices=["meta", "hf"])
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as d:
        paths = _write(Path(d), args.dim, args.layers, args.vocab)
        print(f"{'format':6} {'tp':>3} {'weights MiB':>12} {'peak RSS MiB':>13} {'peak anon MiB':>14} {'load s':>7}")
        for fmt in args.formats:
            res = {tp: _measure(paths[fmt], tp) for tp in (1, 4)}
            for tp, r in res.items():
                print(f"{fmt:6} {tp:3d} {r['weights_mb']:12.0f} {r['rss_mb']:13.0f} {r['anon_mb']:14.0f} {r['seconds']:7.2f}")
                rows.append([fmt, tp, round(r["weights_mb"]), round(r["rss_mb"]), round(r["anon_mb"]),
                             round(r["seconds"], 2)])
            rss = res[4]["rss_mb"] / res[1]["rss_mb"]
            anon = res[4]["anon_mb"] / res[1]["anon_mb"]
            verdict = "meets" if rss <= 0.35 else "misses"
            print(f"{fmt:6} TP=4 rank / TP=1: peak RSS {rss:.2f}x, peak anon {anon:.2f}x "
                  f"({verdict} the 0.35x target on peak RSS)")
            ratios.append([fmt, f"{rss:.2f}x", f"{anon:.2f}x", f"≤ 0.35x: {verdict}"])
    if args.record:
        write_record(args.record, benchmark="bench_load_memory.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"peak memory of loading one rank, TP=4 vs TP=1 (dim {args.dim}, {args.layers} layers, "
                           f"vocabulary {args.vocab}, fp16)",
                     summary="a TP=4 rank's load peak " + " / ".join(f"{r[1]} ({r[0]})" for r in ratios)
                             + " of TP=1's; target ≤ 0.35x",
                     tables=[table(["format", "tp", "weights MiB", "peak RSS MiB", "peak anon MiB", "load s"], rows),
                             table(["format", "TP=4 rank / TP=1: peak RSS", "peak anon", "target"], ratios)])


if __name__ == "__main__":
    main()
