"""Real sizes on this machine: Llama-3.1-8B-shaped exports at TP=1/2/4 and Llama-3.2-1B checked on ORT.

Not a test (it writes ~40 GB and runs for tens of minutes). Every step runs in its own process, so each
peak RSS (VmHWM) is that step's alone. Steps, one at a time, each export removed after measuring:

1. `scripts/make_checkpoint.py --preset llama-3.1-8b` (HF, bf16, the published 4 shards).
2. For TP=1, 2, 4: export fp16; wall time, peak RSS as a ratio to ONE rank's weight bytes and against
   the target (2 GiB + 2x the rank's largest tensor, from `plan`); `onnx.checker` (full check, by path
   so the external data is resolved) on every graph; for TP=4, one rank's segments opened as ONNX
   Runtime sessions and run once in order (collectives replaced by stand-ins: each rank's numbers
   come out of the 1B check below; this shows the sessions load and run at full size).
3. `--preset llama-3.2-1b` (HF bf16, tied, 128256 vocab): fp32 export at TP=1 and TP=2, each validated
   on ONNX Runtime against eager (prefill + 8 greedy decode steps, all ranks in one process) within
   the fp32 tolerance.

    nice -n 10 python benchmarks/bench_real_size.py --work /path/with/50GB [--skip-8b] [--skip-1b]
                                                    [--record benchmarks/results]

--record DIR also writes the tables as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
GiB = 1 << 30

from bench_common import (  # noqa: E402
    add_record_arguments,
    child_main,
    run_child,
    table,
    write_record,
)

COLUMNS_8B = ["export", "tp", "weights/rank GiB", "written GB", "wall s", "peak RSS GiB", "peak / rank weights",
              "target GiB", "onnx.checker", "ONNX Runtime"]
COLUMNS_1B = ["export", "tp", "export s", "export peak GiB", "max abs vs eager", "min cosine", "greedy agree",
              "validation"]


def _md(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ---- child steps (each runs in a fresh process) ---------------------------------------------------
def _make(args: dict) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoint", REPO / "scripts" / "make_checkpoint.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    mc.main(["--preset", args["preset"], "--out", args["out"], "--no-progress"])
    return {}


def _export(args: dict) -> dict:
    from llama_export.config import Precision
    from llama_export.export.exporter import ExportOptions, export

    path = export(ExportOptions(checkpoint=Path(args["ckpt"]), out=Path(args["out"]), tp=args["tp"],
                                dtype=Precision(args["dtype"]), model_name="m", progress=False))
    return {"path": str(path)}


def _check(args: dict) -> dict:
    from llama_export.artifact.manifest import load_manifest, resolve_inside
    from llama_export.artifact.schema import check_model

    root = Path(args["path"])
    m = load_manifest(root, verify_hashes=False)
    n = 0
    for r in m.ranks:
        for seg in r.segments:
            check_model(resolve_inside(root, seg.file))  # by path: external data resolved, not loaded
            n += 1
    return {"graphs": n}


class _StandInComm:
    """Collectives replaced by local stand-ins (all-reduce: identity; all-gather: tp copies)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim: int):
        import numpy as np

        return np.concatenate([x] * self.world_size, axis=dim)


def _ort_rank(args: dict) -> dict:
    import numpy as np
    import torch

    from llama_export.artifact.manifest import load_manifest, verify_rank
    from llama_export.backends.ort import OrtBackend
    from llama_export.runner.stitch import empty_cache, segmented_step

    root, rank = Path(args["path"]), args["rank"]
    m = load_manifest(root, verify_hashes=False)
    t0 = time.perf_counter()
    verify_rank(m, root, rank)  # what a rank process does at start-up: its own files only
    verified = time.perf_counter() - t0
    t0 = time.perf_counter()
    be = OrtBackend(m, root, rank=rank, device="cpu", threads=torch.get_num_threads())
    opened = time.perf_counter() - t0
    step = segmented_step(m, be, comm=_StandInComm(rank, m.tp))
    keys, values = empty_cache(m, rank, 1, 16, backend=be)  # a 16-token KV cache
    tokens = np.random.default_rng(0).integers(0, m.model.vocab_size, (1, 8))
    t0 = time.perf_counter()
    # prefill of 8 tokens at position 0, then one decode step at position 8
    logits, keys, values = step(tokens, np.array([0]), np.array([8]), keys, values)
    logits, _, _ = step(logits.argmax(-1)[:, None], np.array([8]), np.array([1]), keys, values)
    ran = time.perf_counter() - t0
    return {"sessions": len(be.sessions), "verify_s": verified, "open_s": opened, "run_s": ran,
            "finite": bool(np.isfinite(logits).all())}


def _validate(args: dict) -> dict:
    from llama_export.validate.compare import VALIDATION, validate_export

    assert VALIDATION.steps == 8  # prefill + 8 greedy decode steps
    cmp = validate_export(Path(args["path"]), Path(args["ckpt"]))
    return {"ok": bool(cmp), "max_abs": cmp.max_abs, "tolerance": cmp.tolerance, "cosine": cmp.min_cosine,
            "tokens_agree": cmp.tokens_agree}


CHILD = {"make": _make, "export": _export, "check": _check, "ort_rank": _ort_rank, "validate": _validate}


def run_step(step: str, **args) -> dict:
    res = run_child(__file__, step, **args)
    print(f"  [{step}] {json.dumps({k: v for k, v in args.items() if k not in ('out',)})}: "
          f"{res['seconds']:.0f} s, peak RSS {res['peak_rss'] / GiB:.2f} GiB", flush=True)
    return res


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- the benchmark --------------------------------------------------------------------------------
def bench_8b(work: Path, tps: list[int]) -> list[list]:
    from llama_export.config import Precision
    from llama_export.export.sizing import plan_export
    from llama_export.model.checkpoint import load_config

    ckpt = work / "llama-3.1-8b-hf"
    if not ckpt.exists():
        made = run_step("make", preset="llama-3.1-8b", out=str(ckpt))
        print(f"checkpoint: {_du(ckpt) / 1e9:.2f} GB in {made['seconds']:.0f} s, maker peak RSS "
              f"{made['peak_rss'] / GiB:.2f} GiB")
    cfg = load_config(ckpt)
    rows = []
    for tp in tps:
        plan = plan_export(cfg, tp=tp, dtype=Precision.FP16)
        out = work / f"exp-tp{tp}"
        ex = run_step("export", ckpt=str(ckpt), out=str(out), tp=tp, dtype="fp16")
        size = _du(ex["path"])
        chk = run_step("check", path=ex["path"])
        ort = run_step("ort_rank", path=ex["path"], rank=tp - 1) if tp == 4 else None
        shutil.rmtree(out)
        peak = ex["peak_rss"]
        rows.append([
            "8B HF bf16 → fp16", tp, f"{plan.weight_bytes / GiB:.2f}", f"{size / 1e9:.1f}",
            f"{ex['seconds']:.0f} ({ex['seconds'] / (plan.weight_bytes * tp / GiB):.1f} s/GiB)", f"{peak / GiB:.2f}",
            f"{peak / plan.weight_bytes:.2f}x",
            f"{plan.export_target_bytes / GiB:.2f} ({'meets' if peak <= plan.export_target_bytes else 'MISSES'})",
            f"{chk['graphs']} pass ({chk['seconds']:.0f} s, {chk['peak_rss'] / GiB:.2f} GiB)",
            (f"rank {tp - 1}: hashed in {ort['verify_s']:.0f} s, {ort['sessions']} sessions open in "
             f"{ort['open_s']:.0f} s, prefill+1 step "
             f"{ort['run_s']:.1f} s, {ort['peak_rss'] / GiB:.2f} GiB, finite={ort['finite']}" if ort else "-")])
        print(_md(rows[-1]), flush=True)
    return rows


def bench_1b(work: Path) -> list[list]:
    ckpt = work / "llama-3.2-1b-hf"
    if not ckpt.exists():
        made = run_step("make", preset="llama-3.2-1b", out=str(ckpt))
        print(f"checkpoint: {_du(ckpt) / 1e9:.2f} GB in {made['seconds']:.0f} s")
    rows = []
    for tp in (1, 2):
        out = work / f"exp1b-tp{tp}"
        ex = run_step("export", ckpt=str(ckpt), out=str(out), tp=tp, dtype="fp32")
        val = run_step("validate", path=ex["path"], ckpt=str(ckpt))
        shutil.rmtree(out)
        rows.append([
            "1B HF bf16 → fp32", tp, f"{ex['seconds']:.0f}", f"{ex['peak_rss'] / GiB:.2f}",
            f"{val['max_abs']:.2e} (≤ {val['tolerance']:.0e})", f"{val['cosine']:.6f}", f"{val['tokens_agree']:.3f}",
            f"{'ok' if val['ok'] else 'FAIL'} ({val['seconds']:.0f} s, {val['peak_rss'] / GiB:.2f} GiB)"])
        print(_md(rows[-1]), flush=True)
    shutil.rmtree(ckpt)
    return rows


def main() -> None:
    if child_main(CHILD):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (needs ~45 GB free)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep the 8B checkpoint for another run")
    add_record_arguments(ap)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()[0]
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows8 = [] if args.skip_8b else bench_8b(args.work, args.tp)
    rows1 = [] if args.skip_1b else bench_1b(args.work)
    if not args.keep_checkpoint:
        shutil.rmtree(args.work / "llama-3.1-8b-hf", ignore_errors=True)
    print(f"load average at end: {os.getloadavg()}")
    tables = []
    if rows8:
        print("\n" + _md(COLUMNS_8B) + "\n" + _md(["---"] * len(COLUMNS_8B)))
        print("\n".join(_md(r) for r in rows8))
        tables.append(table(COLUMNS_8B, rows8, title="Llama-3.1-8B shapes (HF bf16) exported fp16; target: peak RSS "
                                                     "≤ 2 GiB + 2x the rank's largest tensor"))
    if rows1:
        print("\n" + _md(COLUMNS_1B) + "\n" + _md(["---"] * len(COLUMNS_1B)))
        print("\n".join(_md(r) for r in rows1))
        tables.append(table(COLUMNS_1B, rows1, title="Llama-3.2-1B shapes (HF bf16) exported fp32, validated on ONNX "
                                                     "Runtime against eager"))
    if args.record and tables:
        summary = ("8B bf16 → fp16 at TP=" + "/".join(str(r[1]) for r in rows8) + ": peak RSS "
                   + "/".join(r[5] for r in rows8) + " GiB" if rows8 else
                   "1B at TP=" + "/".join(str(r[1]) for r in rows1) + ": " + ", ".join(r[7] for r in rows1))
        write_record(args.record, benchmark="bench_real_size.py", title="real-size exports ("
                     + ", ".join(n for n, rows in (("8B", rows8), ("1B", rows1)) if rows) + ")", tables=tables,
                     summary=summary, notes=args.record_note, load_at_start=load_at_start)


if __name__ == "__main__":
    main()
