"""llama_export beside onnxruntime-genai and llama.cpp: same weights, same prompt ids, same machine.

One random-weight checkpoint (default: a 134M-parameter model, dim 768 x 12 layers, vocab 32000,
fp32) is written as a Hugging Face folder; from it come our exports, onnxruntime-genai's models (its
model builder, fp32/int8/int4) and llama.cpp GGUF files (f32/q8_0/q4_0, written here with the `gguf`
package from the same tensors; q/k rows in llama.cpp's interleaved order, which is Meta's). Every
(system, workload) runs in a fresh process (`peers_worker.py`) in interleaved rounds, the order rotated
each round; the table shows medians over rounds, ratios to our ONNX Runtime fp32 run of the same round
set, the decode memory-bandwidth bound (weight bytes per token over a tensor-copy bandwidth measured in
each round), peak RSS per process, and how many greedy ids equal ours (fp32).

Workloads (batch 1, --threads threads for everyone):
  short   one prompt of 128 ids -> 128 new tokens
  long    one prompt of 2048 ids -> 128 new tokens (also: decode ms per step here / in `short`)
  ragged  8 prompts of 16..256 ids -> --ragged-new tokens each, run one after another (our ragged
          batching is a separate feature; this is the one-by-one baseline every system can run)

--block-size N (default 32) sets the int8/int4 block size of our exports and onnxruntime-genai's
(`--extra_options block_size=N`); llama.cpp's q8_0/q4_0 keep their blocks of 32, and the bound keeps
ggml's bytes per weight.

The peers are optional and never dependencies of llama_export; a system whose package is missing is
skipped with the line to install it:
    pip install onnxruntime-genai==0.18.0 gguf==0.19.0
    nice -n 10 pip install llama-cpp-python==0.3.36     # compiles llama.cpp: several minutes
    pip install transformers==5.24.0                     # (in '.[test]') the transformers row

    python benchmarks/bench_peers.py [--workloads short long ragged] [--rounds 5] [--workdir DIR]
                                     [--record benchmarks/results]

--workdir keeps the checkpoint and converted models between invocations (rebuilt if the shape changes).
--record DIR also writes the tables as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    BYTES_PER_WEIGHT,
    add_model_arguments,
    add_record_arguments,
    agreement,
    copy_bandwidth,
    model_config,
    random_state,
    run_worker,
    table,
    weight_bytes_per_token,
    write_record,
)
from gguf_llama import checkpoint_to_gguf  # noqa: E402

INSTALL = {
    "onnxruntime_genai": "pip install onnxruntime-genai==0.18.0",
    "llama_cpp": "nice -n 10 pip install llama-cpp-python==0.3.36",
    "gguf": "pip install gguf==0.19.0",
    "transformers": "pip install transformers==5.24.0",
}


@dataclass(frozen=True)
class System:
    label: str  # shown in the table
    worker: str  # peers_worker.py SYSTEM
    precision: str  # fp32 | int8 | int4
    model: Path  # what the worker loads


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- the checkpoint and its conversions ---------------------------------------------------------
def write_hf(cfg, state: dict, out: Path) -> None:
    """config.json + model.safetensors as transformers writes a LlamaForCausalLM (q/k rows rotate-half)."""
    from safetensors.torch import save_file

    from llama_export.model.hf_format import hf_name, interleaved_to_rotate_half

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = interleaved_to_rotate_half(t, cfg.head_dim)
        tensors[hf_name(name)] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }, indent=1))
    write_placeholder_tokenizer(cfg.vocab_size, out)


def write_placeholder_tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer.json over placeholder tokens: onnxruntime-genai's builder copies a tokenizer
    with the model (ids are fed directly, so its pieces never matter)."""
    from tokenizers import Tokenizer, models

    pieces = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab))]
    Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>")).save(
        str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))


def build_genai(hf: Path, out: Path, precision: str, block_size: int) -> float:
    """onnxruntime-genai's model builder on the HF folder (CPU target); returns its wall time."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as logf:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                        "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache"),
                        "--extra_options", f"block_size={block_size}"],
                       check=True, stdout=logf, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    tmp.rename(out)
    return dt


def prepare(args, cfg, work: Path, log) -> list[System]:
    """Write (or reuse) the checkpoint and every conversion; the systems that can run here."""
    stamp = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if (work / "stamp.json").is_file() and (work / "stamp.json").read_text() != stamp:
        log(f"{work} holds another model shape: rebuilding")
        for child in work.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / "stamp.json").write_text(stamp)
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        write_hf(cfg, random_state(cfg), hf)
    systems: list[System] = []

    from llama_export.config import ModelDType
    from llama_export.export.exporter import ExportOptions
    from llama_export.job import run_job

    for spelling in args.ours:
        dtype = ModelDType.parse(spelling)
        if dtype.weights is not None:
            dtype = dataclasses.replace(dtype, weights=dataclasses.replace(dtype.weights, block_size=args.block_size))
        opts = ExportOptions(checkpoint=hf, out=work / "graphs", tp=1, dtype=dtype.activations,
                             weights=dtype.weights, progress=False)
        path = work / "graphs" / "hf" / opts.variant
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            run_job(opts, [1], [dtype], validate=False)  # as `llama-export export`: with the ORT lowering
            log(f"llama_export export {opts.variant}: {time.perf_counter() - t0:.1f} s")
        precision = f"int{dtype.weights.bits}" if dtype.weights else dtype.activations.value
        systems.append(System(f"llama_export ORT {spelling}", "ours-ort", precision, path))
    systems.append(System("llama_export eager fp32", "ours-eager", "fp32", hf))
    if have("transformers"):
        systems.append(System("transformers eager fp32", "transformers", "fp32", hf))
    else:
        log(f"skipping transformers: {INSTALL['transformers']}")

    if have("onnxruntime_genai"):
        for p in ("fp32", "int8", "int4"):
            out = work / (f"genai-{p}" if p == "fp32" or args.block_size == 32 else f"genai-{p}-b{args.block_size}")
            if not out.is_dir():
                log(f"onnxruntime-genai builder {p}: {build_genai(hf, out, p, args.block_size):.1f} s")
            systems.append(System(f"onnxruntime-genai {p}", "genai", p, out))
    else:
        log(f"skipping onnxruntime-genai: {INSTALL['onnxruntime_genai']}")

    if have("llama_cpp") and have("gguf"):
        for qtype, p in (("f32", "fp32"), ("q8_0", "int8"), ("q4_0", "int4")):
            out = work / f"model-{qtype}.gguf"
            if not out.is_file():
                t0 = time.perf_counter()
                checkpoint_to_gguf(hf, out, qtype)
                log(f"GGUF {qtype}: {time.perf_counter() - t0:.1f} s")
            systems.append(System(f"llama.cpp {qtype}", "llamacpp", p, out))
    else:
        missing = [m for m in ("llama_cpp", "gguf") if not have(m)]
        log("skipping llama.cpp: " + "; ".join(INSTALL[m] for m in missing))
    return systems


# ---- running ----------------------------------------------------------------------------------
def workloads(args, vocab: int) -> dict[str, dict]:
    import torch

    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()  # no BOS/EOS/UNK ids

    ragged_lens = [16 + round(i * (256 - 16) / 7) for i in range(8)]
    all_w = {
        "short": {"prompts": [ids(128)], "new": args.new},
        "long": {"prompts": [ids(2048)], "new": args.new},
        "ragged": {"prompts": [ids(n) for n in ragged_lens], "new": args.ragged_new},
    }
    out = {k: all_w[k] for k in args.workloads}
    for w in out.values():
        w["max_len"] = max(len(p) for p in w["prompts"]) + w["new"] + 8
    return out


def _block_size(text: str) -> int:
    """--block-size as our exporter takes it (a power of two >= 16), or argparse's one-line error."""
    from llama_export.config import WeightQuant
    from llama_export.errors import ConfigError

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of input features (e.g. 32, 128)")
    try:
        return WeightQuant(bits=4, block_size=int(text)).block_size
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ragged-new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", default=["short"], choices=["short", "long", "ragged"])
    ap.add_argument("--ours", nargs="+", default=["fp32", "int8", "int4"], help="our export dtypes to run on ORT")
    ap.add_argument("--block-size", type=_block_size, default=32, help="int8/int4 block size of our exports and genai's "
                    "(llama.cpp's q8_0/q4_0 blocks are 32 whatever this says)")
    ap.add_argument("--only", nargs="+", default=None, help="run only systems whose label contains one of these")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models here between runs (default: a temp dir)")
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    cfg = model_config(args, max_seq_len=4096)
    tmp = None
    work = args.workdir
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    work = work.resolve()

    def log(msg: str) -> None:
        print(msg, flush=True)

    print(f"model: {cfg.num_parameters() / 1e6:.0f}M parameters (dim {cfg.dim} x {cfg.n_layers} layers, vocab "
          f"{cfg.vocab_size}), fp32 checkpoint; batch 1, {args.threads} threads, {os.cpu_count()} cores; "
          f"{args.rounds} interleaved rounds, medians; int8/int4 blocks of {args.block_size} (ours, genai; "
          f"llama.cpp q8_0/q4_0: 32)", flush=True)
    systems = prepare(args, cfg, work, log)
    if args.only:
        systems = [s for s in systems if any(o in s.label for o in args.only)]
    loads = workloads(args, cfg.vocab_size)
    results: dict[tuple[str, str], list[dict]] = {}
    bws = []
    for name, w in loads.items():
        wpath = work / f"workload-{name}.json"
        wpath.write_text(json.dumps(w))
        for r in range(args.rounds):
            bws.append(copy_bandwidth())
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            # Other processes on the machine distort every timing (llama.cpp's OpenMP threads suffer most
            # when cores are oversubscribed); the load average is printed so a reader can tell.
            log(f"[{name}] round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} cores)")
            for s in order:
                res = run_worker(s.worker, s.model, wpath, work / "result.json", args.threads, label=s.label)
                if res is not None:
                    results.setdefault((name, s.label), []).append(res)
    bw = statistics.median(bws)
    print(f"\nmemory bandwidth (tensor copy, read+write, median of {len(bws)}): {bw / 1e9:.1f} GB/s")
    bounds = {p: bw / weight_bytes_per_token(cfg, p) for p in BYTES_PER_WEIGHT}
    print("decode bound (weight bytes per token / bandwidth): " +
          " / ".join(f"{p} {b:.0f} tok/s" for p, b in bounds.items()))
    tables, summary = report(systems, loads, results, bounds)
    if args.record:
        note = (f"{args.rounds} interleaved rounds, medians; {args.threads} threads per system; int8/int4 blocks of "
                f"{args.block_size} (ours and onnxruntime-genai; llama.cpp q8_0/q4_0: 32); memory bandwidth (tensor "
                f"copy) {bw / 1e9:.1f} GB/s; decode bound " + " / ".join(f"{p} {b:.0f}" for p, b in bounds.items())
                + " tok/s")
        write_record(args.record, benchmark="bench_peers.py", tables=tables, summary=summary,
                     title=f"{cfg.num_parameters() / 1e6:.0f}M model, workloads {' '.join(loads)}, {args.threads} "
                           f"threads, {args.rounds} rounds", notes=[note, *args.record_note],
                     load_at_start=load_at_start)
    if tmp is not None:
        tmp.cleanup()


def _med(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def report(systems, loads, results, bounds) -> tuple[list, str]:
    """Print the tables and the targets; return them as record tables, and a one-line summary."""
    base_label = "llama_export ORT fp32"
    summary: dict[tuple[str, str], dict] = {}
    tables = []
    for name, w in loads.items():
        rows = []
        new = w["new"]
        n_prompts = len(w["prompts"])
        ref = results.get((name, base_label))
        ref_ids = [x["ids"] for x in ref[0]["runs"]] if ref else None
        print(f"\n== {name}: {n_prompts} prompt(s) of {sorted({len(p) for p in w['prompts']})} ids -> {new} new, "
              f"one at a time ==")
        print(f"{'system':<26} {'prefill ms':>10} {'decode tok/s':>12} {'spread':>7} {'vs ours':>7} "
              f"{'of bound':>8} {'total tok/s':>11} {'peak RSS GB':>11} {'load s':>6}  ids = ours fp32")
        for s in systems:
            runs = results.get((name, s.label))
            if not runs:
                continue
            prefill = _med(runs, lambda r: sum(x["prefill_s"] for x in r["runs"]) / n_prompts)
            decs = [n_prompts * (new - 1) / sum(x["decode_s"] for x in r["runs"]) for r in runs]
            dec = statistics.median(decs)
            total = _med(runs, lambda r: n_prompts * new / sum(x["prefill_s"] + x["decode_s"] for x in r["runs"]))
            rss = _med(runs, lambda r: r["peak_rss"])
            summary[(name, s.label)] = {"prefill_ms": prefill * 1e3, "decode": dec, "rss": rss,
                                        "precision": s.precision, "total": total}
            base = summary.get((name, base_label))
            vs = f"{dec / base['decode']:6.2f}x" if base else "    —"
            spread = (max(decs) - min(decs)) / 2 / dec
            agree = agreement([x["ids"] for x in runs[0]["runs"]], ref_ids) if ref_ids else "—"
            print(f"{s.label:<26} {prefill * 1e3:10.1f} {dec:12.1f} {spread:6.0%} {vs:>7} "
                  f"{dec / bounds[s.precision]:8.0%} {total:11.1f} {rss / 1e9:11.2f} "
                  f"{_med(runs, lambda r: r['load_s']):6.1f}  {agree}")
            rows.append([s.label, round(prefill * 1e3, 1), round(dec, 1), f"±{spread:.0%}", vs.strip(),
                         f"{dec / bounds[s.precision]:.0%}", round(total, 1), round(rss / 1e9, 2),
                         round(_med(runs, lambda r: r["load_s"]), 1), agree])
        if rows:
            tables.append(table(["system", "prefill ms", "decode tok/s", "spread", "vs ours", "of bound",
                                 "total tok/s", "peak RSS GB", "load s", "ids = ours fp32"], rows,
                                title=f"{name}: {n_prompts} prompt(s) of {sorted({len(p) for p in w['prompts']})} "
                                      f"ids -> {new} new, one at a time"))
    lines = targets(summary, loads)
    if lines:
        tables.append(table(["target", "ratio", "goal", "verdict"], lines, title="against the targets"))
    parts = []
    for p in ("fp32", "int8", "int4"):
        ours = summary.get(("short", f"llama_export ORT {p}"))
        genai = summary.get(("short", f"onnxruntime-genai {p}"))
        if ours:
            parts.append(f"{p} {ours['decode']:.1f}" + (f" ({ours['decode'] / genai['decode']:.2f}x genai)" if genai else ""))
    return tables, ("decode tok/s at 128 → 128: ORT " + ", ".join(parts)) if parts else ""


def targets(summary, loads) -> list[list]:
    """The targets, as ratios of this run's medians (only those whose rows ran): printed, and returned as
    rows [what, ratio, goal, verdict]."""
    def get(w, label, key):
        row = summary.get((w, label))
        return row[key] if row else None

    lines = []

    def ratio(text, a, b, goal, higher=True):
        if a is None or b is None:
            return
        r = a / b
        ok = r >= goal if higher else r <= goal
        lines.append([text, round(r, 2), f"{'≥' if higher else '≤'} {goal}", "met" if ok else "MISSED"])

    genai = {"fp32": "onnxruntime-genai fp32", "int8": "onnxruntime-genai int8", "int4": "onnxruntime-genai int4"}
    lcpp = {"fp32": "llama.cpp f32", "int8": "llama.cpp q8_0", "int4": "llama.cpp q4_0"}
    for p in ("fp32", "int8", "int4"):
        ours = f"llama_export ORT {p}"
        d = get("short", ours, "decode")
        ratio(f"{p} decode vs onnxruntime-genai {p}", d, get("short", genai[p], "decode"), 1.1)
        ratio(f"{p} decode vs {lcpp[p]}", d, get("short", lcpp[p], "decode"), {"fp32": 1.0, "int8": 1.0, "int4": 1.5}[p])
        peers = [v for v in (get("short", genai[p], "prefill_ms"), get("short", lcpp[p], "prefill_ms")) if v]
        if peers:
            ratio(f"{p} prefill ms vs best peer", get("short", ours, "prefill_ms"), min(peers), 0.9, higher=False)
        ratio(f"long: {p} decode vs onnxruntime-genai {p}", get("long", ours, "decode"),
              get("long", genai[p], "decode"), 1.1)
        if "long" in loads and "short" in loads:
            # per-step time at context ~2048 over per-step time at ~128 = decode rate short / long
            ratio(f"long: {p} per-step time at ctx 2048 / at ctx 128", get("short", ours, "decode"),
                  get("long", ours, "decode"), 1.5, higher=False)
    ratio("peak RSS int4 / fp32 (short)", get("short", "llama_export ORT int4", "rss"),
          get("short", "llama_export ORT fp32", "rss"), 0.35, higher=False)
    if lines:
        print("\ntargets, from the medians above:")
        print("\n".join(f"  {t:<62} {r:6.2f}  (target {g.replace('≥', '>=').replace('≤', '<=')})  {v}"
                        for t, r, g, v in lines))
    return lines


if __name__ == "__main__":
    from llama_export.errors import LlamaExportError

    try:
        main()
    except LlamaExportError as e:  # e.g. a --block-size that does not divide the model's dimensions
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
