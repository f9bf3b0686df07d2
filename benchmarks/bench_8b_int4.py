"""Real size: a Llama-3.1-8B-shaped checkpoint in int4 on ONNX Runtime CPU, beside llama.cpp q4_0 of the
same weights.

From an HF checkpoint folder (`scripts/make_checkpoint.py --preset llama-3.1-8b --out DIR`: bf16, random
weights, the published 4 shards, ~16 GB):
1. our int4 export at TP=1 (weights in blocks of 32, fp32 activations; `llama-export export --dtype int4`):
   wall time and peak RSS of the exporting process;
2. a llama.cpp GGUF q4_0 of the same tensors (`gguf_llama.py`: read, quantized and written one tensor at
   a time, never the whole model in memory): wall time and peak RSS;
3. both run in their own processes (`peers_worker.py`), the same prompt ids -> --new tokens, greedy,
   batch 1, --threads threads each, in interleaved rounds: medians of prefill ms, decode tok/s, peak RSS,
   the ratio ours / llama.cpp, the decode bound (int4 weight bytes per token over a tensor-copy bandwidth
   measured in each round), whether every step's logits were finite, and how many greedy ids agree
   (random weights: the two int4 schemes round differently and the top logits are close, so agreement
   is reported, not expected).

Needs `pip install gguf==0.19.0` here and llama-cpp-python==0.3.36 in the interpreter given by
--llama-python (default: this one; it compiles llama.cpp for minutes, so another virtualenv that has it
may be named instead; the worker needs only llama_cpp and numpy there). Not a test: it writes ~10 GB
next to the checkpoint (--work) and runs for tens of minutes on 2 cores; the export and GGUF are deleted
at the end unless --keep (then a second invocation reuses them).

    nice -n 10 python benchmarks/bench_8b_int4.py --checkpoint ckpts/llama-3.1-8b-hf [--rounds 2]
                                                  [--record benchmarks/results]

--record DIR also writes the table as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    add_record_arguments,
    agreement,
    child_main,
    copy_bandwidth,
    run_child,
    run_worker,
    table,
    weight_bytes_per_token,
    write_record,
)

GiB = 1 << 30


# ---- the two preparation steps, each in its own process (its peak RSS is its own) ------------------
def _export(args: dict) -> dict:
    from llama_export.config import ModelDType
    from llama_export.export.exporter import ExportOptions
    from llama_export.job import run_job

    # as `llama-export export --no-validate`: with the ONNX Runtime lowering the run opens
    opts = ExportOptions(checkpoint=Path(args["checkpoint"]), out=Path(args["out"]), model_name="m", progress=False)
    (report,) = run_job(opts, [1], [ModelDType.parse("int4")], validate=False)
    return {"path": str(report.path)}


def _gguf(args: dict) -> dict:
    from gguf_llama import checkpoint_to_gguf

    checkpoint_to_gguf(Path(args["checkpoint"]), Path(args["out"]), "q4_0", name="llama-3.1-8b-shaped-random")
    return {"path": args["out"]}


CHILD = {"export": _export, "gguf": _gguf}


def _du(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(ckpt: Path, work: Path) -> tuple[Path, Path, list[str]]:
    """The int4 export and the q4_0 GGUF (reused when a --keep run left them); the lines describing them."""
    notes = []
    export_dir = work / "graphs" / "m" / "tp1-int4-fp32"
    if not (export_dir / "manifest.json").is_file():
        ex = run_child(__file__, "export", checkpoint=str(ckpt), out=str(work / "graphs"))
        export_dir = Path(ex["path"])
        notes.append(f"our int4 export (TP=1): {ex['seconds']:.0f} s, peak RSS {ex['peak_rss'] / GiB:.2f} GiB, "
                     f"{_du(export_dir) / 1e9:.2f} GB written")
    else:
        notes.append(f"our int4 export: reused {export_dir} ({_du(export_dir) / 1e9:.2f} GB)")
    print(notes[-1], flush=True)
    gguf = work / "model-q4_0.gguf"
    if not gguf.is_file():
        g = run_child(__file__, "gguf", checkpoint=str(ckpt), out=str(gguf))
        notes.append(f"llama.cpp GGUF q4_0 (gguf {_gguf_version()}, streamed): {g['seconds']:.0f} s, peak RSS "
                     f"{g['peak_rss'] / GiB:.2f} GiB, {_du(gguf) / 1e9:.2f} GB written")
    else:
        notes.append(f"llama.cpp GGUF q4_0: reused {gguf} ({_du(gguf) / 1e9:.2f} GB)")
    print(notes[-1], flush=True)
    return export_dir, gguf, notes


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


# ---- the runs ---------------------------------------------------------------------------------------
def main() -> None:
    if child_main(CHILD):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="HF (or Meta) checkpoint folder of the 8B model")
    ap.add_argument("--work", type=Path, default=None,
                    help="where the export and GGUF go (default: <checkpoint>.bench-int4 beside it; ~10 GB)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the Python that has llama_cpp (llama-cpp-python==0.3.36) for the llama.cpp worker")
    ap.add_argument("--keep", action="store_true", help="keep the export and the GGUF (a rerun reuses them)")
    add_record_arguments(ap)
    args = ap.parse_args()
    if args.prompt_len < 16 or args.new < 2 or args.rounds < 1 or args.threads < 1:
        ap.error("--prompt-len >= 16 (the warm-up uses 16 ids), --new >= 2, --rounds >= 1, --threads >= 1")
    ckpt = args.checkpoint.resolve()
    if not (ckpt / "config.json").is_file() and not (ckpt / "params.json").is_file():
        ap.error(f"{ckpt} holds no config.json / params.json; make it with "
                 "scripts/make_checkpoint.py --preset llama-3.1-8b --out DIR")
    work = (args.work or ckpt.with_name(ckpt.name + ".bench-int4")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from llama_export.model.checkpoint import load_config

    cfg = load_config(ckpt)
    load_at_start = os.getloadavg()[0]
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"{started}; model: {cfg.num_parameters() / 1e9:.2f}B parameters (dim {cfg.dim} x {cfg.n_layers} layers, "
          f"{cfg.n_heads}/{cfg.n_kv_heads} heads, vocab {cfg.vocab_size}); prompt {args.prompt_len} ids -> "
          f"{args.new} new, batch 1, {args.threads} threads, {os.cpu_count()} cores; load average at start "
          f"{os.getloadavg()}", flush=True)
    export_dir, gguf, notes = prepare(ckpt, work)

    g = torch.Generator().manual_seed(1)
    # ids below 128000 avoid Llama 3's special tokens; 3.. avoids the GGUF's placeholder <unk>/<s>/</s>
    prompt = torch.randint(3, min(cfg.vocab_size, 128000), (args.prompt_len,), generator=g).tolist()
    workload = work / "workload.json"
    workload.write_text(json.dumps({"prompts": [prompt], "new": args.new,
                                    "max_len": args.prompt_len + args.new + 8}))
    systems = [("llama_export ORT int4", "ours-ort", export_dir, sys.executable),
               ("llama.cpp q4_0", "llamacpp", gguf, args.llama_python)]
    results: dict[str, list[dict]] = {}
    bws, loads = [], []
    for r in range(args.rounds):
        bws.append(copy_bandwidth())
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} (load average {loads[-1]:.1f})", flush=True)
        for label, worker, model, python in (systems if r % 2 == 0 else systems[::-1]):
            res = run_worker(worker, model, workload, work / "result.json", args.threads, python=python, label=label)
            if res is None:
                continue
            results.setdefault(label, []).append(res)
            run = res["runs"][0]
            print(f"  {label}: load {res['load_s']:.0f} s, prefill {run['prefill_s'] * 1e3:.0f} ms, decode "
                  f"{(args.new - 1) / run['decode_s']:.2f} tok/s, peak RSS {res['peak_rss'] / GiB:.2f} GiB", flush=True)
    rows, more_notes, summary = report(cfg, args, results, statistics.median(bws), notes, started, loads)
    if args.record:
        write_record(args.record, benchmark="bench_8b_int4.py", load_at_start=load_at_start, summary=summary,
                     title=f"{cfg.num_parameters() / 1e9:.2f}B parameters, int4 on ONNX Runtime CPU vs llama.cpp "
                           f"q4_0, {args.rounds} rounds",
                     tables=[table(["system (same weights, same prompt ids)", "load s", "prefill ms", "decode tok/s",
                                    "spread", "of bound", "RSS after load GiB", "peak RSS GiB", "vs llama.cpp q4_0",
                                    "logits finite", "greedy ids = llama.cpp's"], rows,
                                   title=f"medians of {args.rounds} interleaved rounds; prompt {args.prompt_len} ids "
                                         f"-> {args.new} new, greedy, batch 1, {args.threads} threads each")],
                     notes=[*notes, f"load average {min(loads):.1f}-{max(loads):.1f} during the rounds",
                            *more_notes, *args.record_note])
    if not args.keep:
        shutil.rmtree(work / "graphs", ignore_errors=True)
        gguf.unlink(missing_ok=True)
        workload.unlink(missing_ok=True)
        (work / "result.json").unlink(missing_ok=True)
        if not any(work.iterdir()):
            work.rmdir()


def report(cfg, args, results: dict[str, list[dict]], bw: float, notes: list[str], started: str,
           loads: list[float]) -> tuple[list[list], list[str], str]:
    """Print the table; return its rows, more notes (bandwidth, greedy ids) and a one-line summary (for the
    record)."""
    bound = bw / weight_bytes_per_token(cfg, "int4")
    print(f"\n{started}, load average {min(loads):.1f}-{max(loads):.1f} during the rounds; {args.rounds} rounds, "
          f"medians; prompt {args.prompt_len} ids -> {args.new} new; {args.threads} threads")
    print("\n".join(notes))
    print(f"memory bandwidth (tensor copy, read+write, median of {len(loads)}): {bw / 1e9:.1f} GB/s; int4 decode "
          f"bound ({weight_bytes_per_token(cfg, 'int4') / 1e9:.2f} GB of weights per token at 18 bytes / 32 "
          f"weights): {bound:.2f} tok/s")
    print("\n| system (same weights, same prompt ids) | load s | prefill ms | decode tok/s | spread | of bound | "
          "RSS after load GiB | peak RSS GiB | vs llama.cpp q4_0 | logits finite | greedy ids = llama.cpp's |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results.get("llama.cpp q4_0")
    base_dec = statistics.median((args.new - 1) / r["runs"][0]["decode_s"] for r in base) if base else None
    ids_lines, rows, decs_by = [], [], {}
    for label, runs in results.items():
        decs = [(args.new - 1) / r["runs"][0]["decode_s"] for r in runs]
        dec = statistics.median(decs)
        prefill = statistics.median(r["runs"][0]["prefill_s"] for r in runs) * 1e3
        rss = statistics.median(r["peak_rss"] for r in runs) / GiB
        loaded = statistics.median(r["rss_loaded"] for r in runs) / GiB
        load = statistics.median(r["load_s"] for r in runs)
        spread = (max(decs) - min(decs)) / 2 / dec
        finite = {r["runs"][0]["finite"] for r in runs}
        vocab_ok = all(0 <= i < cfg.vocab_size for r in runs for i in r["runs"][0]["ids"])
        same_ids = all(r["runs"][0]["ids"] == runs[0]["runs"][0]["ids"] for r in runs)
        agree = agreement([runs[0]["runs"][0]["ids"]], [base[0]["runs"][0]["ids"]]) if base and runs is not base else "—"
        vs = f"{dec / base_dec:.2f}x" if base_dec else "—"
        print(f"| {label} | {load:.0f} | {prefill:.0f} | {dec:.2f} | ±{spread:.0%} | {dec / bound:.0%} | {loaded:.2f} | {rss:.2f} | "
              f"{vs} | {'yes' if finite == {True} else finite} | {agree} |")
        rows.append([label, round(load), round(prefill), round(dec, 2), f"±{spread:.0%}", f"{dec / bound:.0%}",
                     round(loaded, 2), round(rss, 2), vs, finite == {True}, agree])
        decs_by[label] = dec
        ids_lines.append(f"{label}: greedy ids {runs[0]['runs'][0]['ids']} (all in the vocabulary: {vocab_ok}; "
                         f"the same in every round: {same_ids})")
    print("\n" + "\n".join(ids_lines))
    ours = decs_by.get("llama_export ORT int4")
    summary = (f"decode {ours:.2f} vs llama.cpp q4_0's {base_dec:.2f} tok/s ({ours / base_dec:.2f}x)"
               if ours and base_dec else "")
    bw_line = f"memory bandwidth (tensor copy, read+write) {bw / 1e9:.1f} GB/s; int4 decode bound {bound:.2f} tok/s"
    return rows, [bw_line, *ids_lines], summary


if __name__ == "__main__":
    main()
