"""Lean at run time and the in-place KV cache: our ONNX Runtime export beside onnxruntime-genai's model
builder and Generator on the same random-weight Hugging Face checkpoint.

    python benchmarks/bench_lean.py [--dim 768 --layers 12 --heads 12 --vocab 32000] [--rounds 3]
                                    [--work DIR] [--no-genai] [--export-only] [--baseline CHECKOUT]
                                    [--record benchmarks/results]

Prints, each as a median over interleaved rounds (each system in its own process, so RSS is its own):
- export time without validation (`llama-export export --no-validate`) vs genai's builder (`-p fp32 -e cpu`);
- nodes and MatMuls per layer of the graph ONNX Runtime receives (ours: the lowered graph);
- RSS after loading and peak RSS of a prompt 128 -> 128 new run, against the rank's weight bytes;
- time from process start to the first token (prompt 128), both systems; and, for ours, the
  `llama-export run --prompt-ids ... --max-new-tokens 1` command: its first token (the `first_token_s` it
  writes to --json, from the process's start in /proc) and its exit;
- eager: peak RSS of loading the model minus the process's RSS before loading, against the weights;
- long context: per decode step at context ~2048 vs ~128 (prompt 2048 / 128 -> 128 new), decode tok/s
  against genai at prompt 2048;
- ragged batch: 8 prompts of 16..256 tokens -> 64 new each, one batch vs one by one (tokens/s), and
  whether every row's ids equal its single run.

onnxruntime-genai is an optional install (`pip install onnxruntime-genai`); without it (or with
--no-genai) only our figures print. Thread count: OMP_NUM_THREADS (default 2) for every system.
CPU numbers on a shared machine are noisy: rounds are interleaved and medians reported. With --record
DIR the figures are also written as a JSON record (benchmarks/report.py turns the records into
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import add_record_arguments, table, write_record  # noqa: E402

LONG, SHORT, NEW = 2048, 128, 128
RAGGED = [16 + round(i * (256 - 16) / 7) for i in range(8)]  # 16 .. 256
RAGGED_NEW = 64


def _rss(field: str = "VmRSS") -> int:
    """Bytes of this process: VmRSS now, or VmHWM (its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31 + 3) % (vocab - 3) + 3 for i in range(n)]


# ---- workers (one system, one workload, own process) ----------------------------------------------
def worker_ours(kind: str, path: Path, spawned: float, vocab: int) -> dict:
    import numpy as np

    from llama_export.config import Backend
    from llama_export.parallel.comm import LocalComm
    from llama_export.engine.batch import generate
    from llama_export.engine.generate import pad_prompts
    from llama_export.runner.source import ModelSource

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    backend = Backend.ORT if kind != "eager" else Backend.EAGER
    if backend is Backend.EAGER:
        import torch  # noqa: F401 - the eager load is measured from here, not torch's own import (~200 MB)
    before = _rss()
    source = ModelSource(backend, artifacts=path if backend is Backend.ORT else None,
                         checkpoint=path if backend is Backend.EAGER else None)
    step, make_cache, _ = source.step(comm=LocalComm(), device="cpu", threads=threads)  # ORT: imports no torch
    out = {"rss_before_load": before, "rss_loaded": _rss(), "hwm_loaded": _rss("VmHWM")}
    if kind == "eager":
        return out

    def run(rows: list[list[int]], new: int):
        ids, lengths = pad_prompts(rows)
        return generate(step, ids, make_cache(len(rows), int(lengths.max()) + new), max_new_tokens=new,
                        prompt_lengths=lengths)

    if kind == "run128":
        prompt = np.array([_prompt(SHORT, vocab)])
        started = time.time() - spawned
        r = generate(step, prompt, make_cache(1, SHORT + NEW), max_new_tokens=NEW)
        out["first_token_s"] = started + r.prefill_s  # the prefill call samples the first token
        out["hwm_run"] = _rss("VmHWM")
        return out
    run([_prompt(16, vocab)], 4)  # warm-up
    for n in (SHORT, LONG):
        r = run([_prompt(n, vocab)], NEW)
        out[f"step_s_{n}"] = r.decode_s / (NEW - 1)
    rows = [_prompt(n, vocab, seed=i) for i, n in enumerate(RAGGED)]
    t0 = time.perf_counter()
    batch = run(rows, RAGGED_NEW)
    out["ragged_batch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [run([r], RAGGED_NEW) for r in rows]
    out["ragged_single_s"] = time.perf_counter() - t0
    out["ragged_equal"] = all(batch.new_tokens[i].tolist() == s.new_tokens[0].tolist() for i, s in enumerate(singles))
    return out


def worker_genai(kind: str, path: Path, spawned: float, vocab: int) -> dict:
    import onnxruntime_genai as og

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    out = {"rss_loaded": _rss()}

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([prompt])
        gen.generate_next_token()
        t0 = time.time()
        for _ in range(new - 1):
            gen.generate_next_token()
        return t0, (time.time() - t0) / (new - 1)

    if kind == "run128":
        first, _ = run(_prompt(SHORT, vocab), NEW)
        out["first_token_s"] = first - spawned
        out["hwm_run"] = _rss("VmHWM")
        return out
    run(_prompt(16, vocab), 4)
    for n in (SHORT, LONG):
        out[f"step_s_{n}"] = run(_prompt(n, vocab), NEW)[1]
    return out


def cli_first_token(path: Path, vocab: int) -> dict:
    """`llama-export run` (prompt SHORT ids -> 1 new token): seconds from its start to the first token (what
    it reports in --json, from /proc) and to its exit."""
    ids = ",".join(map(str, _prompt(SHORT, vocab)))
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    out = path.parent / "cli-run.json"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "llama_export.cli", "run", "--backend", "ort", "--artifacts", str(path),
                    "--prompt-ids", ids, "--max-new-tokens", "1", "--threads", threads, "--no-progress",
                    "--json", str(out)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)
    return {"cli_s": time.time() - t0, "cli_first_token_s": json.loads(out.read_text())["first_token_s"]}


def spawn(system: str, kind: str, path: Path, vocab: int) -> dict:
    out = path.parent / f"result-{system}-{kind}.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, __file__, "--worker", system, kind, str(path), repr(time.time()), str(vocab),
                    str(out)], check=True, env=env)
    return json.loads(out.read_text())


# ---- preparation ----------------------------------------------------------------------------------
def make_checkpoint(args, hf: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=int(2 * 4 * args.dim / 3 + 255) // 256 * 256,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=LONG + NEW + 64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(hf)
    # onnxruntime-genai's builder copies a tokenizer with the model; ids are fed directly.
    pieces = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, args.vocab))]
    Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>")).save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def export_ours(hf: Path, out: Path, repo: Path = REPO) -> tuple[float, Path]:
    """Seconds of `llama-export export --no-validate` from the checkout `repo` (default: this one)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llama_export.cli", "export", "--checkpoint", str(hf), "--tp", "1",
                    "--out", str(out), "--name", "bench", "--no-validate", "--no-progress"], check=True,
                   env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, out / "bench" / "tp1-fp32"


def export_genai(hf: Path, out: Path) -> float:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
                    "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def graph_stats_ours(path: Path) -> tuple[int, int, int]:
    """(nodes, MatMuls, weight bytes) of the graphs ONNX Runtime receives for rank 0: the lowering the
    export wrote (`<segment>.ort.onnx`)."""
    import onnx_ir as ir

    from llama_export.artifact.manifest import load_manifest, resolve_inside

    nodes = matmuls = size = 0
    for seg in load_manifest(path, verify_hashes=False).rank(0).segments:
        model = ir.load(str(resolve_inside(path, seg.ort.file)))
        nodes += len(model.graph)
        matmuls += sum(n.op_type in ("MatMul", "Gemm") for n in model.graph)
        size += sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return nodes, matmuls, size


def graph_stats_genai(path: Path) -> tuple[int, int]:
    import onnx

    g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return len(g.node), sum(n.op_type in ("MatMul", "Gemm") for n in g.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_lean"))
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="time the exports only (and --baseline's)")
    ap.add_argument("--baseline", type=Path, help="another checkout (e.g. `git archive` of an earlier commit) "
                    "whose export is timed in the same interleaved rounds")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    add_record_arguments(ap)
    args = ap.parse_args()
    if args.worker:
        system, kind, path, spawned, vocab, out = args.worker
        fn = worker_ours if system == "ours" else worker_genai
        Path(out).write_text(json.dumps(fn(kind, Path(path), float(spawned), int(vocab))))
        return

    genai = not args.no_genai
    if genai:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            print("onnxruntime-genai is not installed (pip install onnxruntime-genai): our figures only")
            genai = False
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = work / f"hf-{args.dim}x{args.layers}-{args.vocab}"
    if not (hf / "config.json").is_file():
        make_checkpoint(args, hf)
    med = statistics.median
    load_before = os.getloadavg()[0]
    figures: list[list] = []  # [figure, ours, genai, ratio, target] for the record

    def record(title: str, summary: str) -> None:
        if args.record:
            write_record(args.record, benchmark="bench_lean.py", title=title, summary=summary, notes=args.record_note,
                         load_at_start=load_before, tables=[table(
                             ["figure", "ours", "onnxruntime-genai", "ratio", "target"], figures,
                             title=f"{args.rounds} interleaved rounds, medians; threads "
                                   f"{os.environ.get('OMP_NUM_THREADS', '2')}")])

    ex_ours, ex_genai, ex_base = [], [], []
    for _ in range(args.rounds):
        dt, ours_path = export_ours(hf, work / "ours")
        ex_ours.append(dt)
        if genai:
            ex_genai.append(export_genai(hf, work / "genai"))
        if args.baseline:
            ex_base.append(export_ours(hf, work / "baseline", args.baseline)[0])
    nodes, matmuls, weights = graph_stats_ours(ours_path)
    L = args.layers
    print(f"model: dim {args.dim}, {L} layers, vocab {args.vocab}, fp32 weights {weights / 2**20:.0f} MiB; "
          f"threads {os.environ.get('OMP_NUM_THREADS', '2')}, {args.rounds} interleaved rounds (medians)")
    line = f"export (no validation): ours {med(ex_ours):.1f} s"
    if genai:
        line += f", genai builder {med(ex_genai):.1f} s, ratio {med(ex_ours) / med(ex_genai):.2f} (target <= 2)"
    if args.baseline:
        line += f"; baseline {args.baseline} {med(ex_base):.1f} s, ours / baseline {med(ex_ours) / med(ex_base):.2f}"
    print(line)
    figures.append(["export, no validation (s)", round(med(ex_ours), 1), round(med(ex_genai), 1) if genai else None,
                    round(med(ex_ours) / med(ex_genai), 2) if genai else None, "≤ 2"])
    if args.baseline:
        figures.append([f"export of {args.baseline} (s)", round(med(ex_base), 1), None,
                        round(med(ex_ours) / med(ex_base), 2), "ours / baseline"])
    rounds = [ex_ours, ex_genai, ex_base]
    print(f"  load average (1 min) {load_before:.1f} before the exports, {os.getloadavg()[0]:.1f} after; rounds (s): "
          + "; ".join(f"{name} {' '.join(f'{t:.1f}' for t in ts)}"
                                       for name, ts in zip(("ours", "genai", "baseline"), rounds) if ts))
    if args.export_only:
        record(f"{args.dim}x{args.layers} fp32 model, export time only", f"export {med(ex_ours):.1f} s"
               + (f" = {med(ex_ours) / med(ex_genai):.2f}x genai's builder" if genai else ""))
        return
    line = f"graph ORT receives: ours {nodes} nodes = {nodes / L:.1f}/layer, {matmuls / L:.1f} MatMul/layer"
    g_nodes = g_mm = None
    if genai:
        g_nodes, g_mm = graph_stats_genai(work / "genai")
        line += (f"; genai {g_nodes} nodes = {g_nodes / L:.1f}/layer, {g_mm / L:.1f} MatMul/layer; "
                 f"ratio {nodes / g_nodes:.2f} (target <= 1.5)")
    print(line)
    figures.append(["graph nodes per layer", round(nodes / L, 1), round(g_nodes / L, 1) if genai else None,
                    round(nodes / g_nodes, 2) if genai else None, "≤ 1.5"])
    figures.append(["MatMuls per layer", round(matmuls / L, 1), round(g_mm / L, 1) if genai else None, None, ""])

    res: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for system, kind, path in [("ours", "run128", ours_path), ("ours", "long", ours_path),
                                   ("ours", "eager", hf)] + ([("genai", "run128", work / "genai"),
                                                             ("genai", "long", work / "genai")] if genai else []):
            res.setdefault(f"{system}-{kind}", []).append(spawn(system, kind, path, args.vocab))
        res.setdefault("ours-cli", []).append(cli_first_token(ours_path, args.vocab))

    def m(key: str, field: str) -> float:
        return med(r[field] for r in res[key])

    mib = 2**20
    loaded, peak = m("ours-run128", "rss_loaded"), m("ours-run128", "hwm_run")
    print(f"ORT run (prompt {SHORT} -> {NEW}): RSS after loading {loaded / mib:.0f} MiB = "
          f"{(loaded - 300 * mib) / weights:.2f}x weights + 300 MiB (target <= 1.1); peak {peak / mib:.0f} MiB = "
          f"{(peak - 300 * mib) / weights:.2f}x weights + 300 MiB (target <= 1.25)")
    figures.append(["RSS after loading (MiB; ratio: x weights + 300 MiB)", round(loaded / mib), None,
                    round((loaded - 300 * mib) / weights, 2), "≤ 1.1"])
    figures.append([f"peak RSS, {SHORT} -> {NEW} run (MiB; ratio: x weights + 300 MiB)", round(peak / mib),
                    round(m("genai-run128", "hwm_run") / mib) if genai else None,
                    round((peak - 300 * mib) / weights, 2), "≤ 1.25"])
    eager = med(r["hwm_loaded"] - r["rss_before_load"] for r in res["ours-eager"])
    print(f"eager load: peak RSS - RSS before loading = {eager / mib:.0f} MiB = {eager / weights:.2f}x weights "
          "(target <= 1.2)")
    figures.append(["eager load: peak - RSS before (MiB; ratio: x weights)", round(eager / mib), None,
                    round(eager / weights, 2), "≤ 1.2"])
    line = f"process start -> first token (prompt {SHORT}): ours {m('ours-run128', 'first_token_s'):.2f} s"
    if genai:
        line += (f", genai {m('genai-run128', 'first_token_s'):.2f} s (peak RSS {m('genai-run128', 'hwm_run') / mib:.0f}"
                 f" MiB); ratio {m('ours-run128', 'first_token_s') / m('genai-run128', 'first_token_s'):.2f} (target <= 1)")
    cli_first = m("ours-cli", "cli_first_token_s")
    line += f"; `llama-export run`: first token {cli_first:.2f} s, exit {m('ours-cli', 'cli_s'):.2f} s"
    if genai:
        line += f", ratio {cli_first / m('genai-run128', 'first_token_s'):.2f}"
    print(line)
    ours_first = m("ours-run128", "first_token_s")
    g_first = m("genai-run128", "first_token_s") if genai else None
    figures.append(["process start to first token (s)", round(ours_first, 2), round(g_first, 2) if genai else None,
                    round(ours_first / g_first, 2) if genai else None, "≤ 1"])
    figures.append(["`llama-export run`: first token (s)", round(cli_first, 2), round(g_first, 2) if genai else None,
                    round(cli_first / g_first, 2) if genai else None, f"exit at {m('ours-cli', 'cli_s'):.2f} s"])
    s128, s2048 = m("ours-long", f"step_s_{SHORT}"), m("ours-long", f"step_s_{LONG}")
    line = (f"decode step at context ~{SHORT}: {s128 * 1e3:.1f} ms, ~{LONG}: {s2048 * 1e3:.1f} ms, ratio "
            f"{s2048 / s128:.2f} (target <= 1.5); decode at {LONG}: ours {1 / s2048:.1f} tok/s")
    if genai:
        g2048 = m("genai-long", f"step_s_{LONG}")
        line += (f", genai {1 / g2048:.1f} tok/s, ratio {g2048 / s2048:.2f} (target >= 1.1); genai step ratio "
                 f"{g2048 / m('genai-long', f'step_s_{SHORT}'):.2f}")
    print(line)
    figures.append([f"decode step at context {LONG} / {SHORT} (ms)", f"{s2048 * 1e3:.1f} / {s128 * 1e3:.1f}", None,
                    round(s2048 / s128, 2), "≤ 1.5"])
    figures.append([f"decode at context {LONG} (tok/s)", round(1 / s2048, 1), round(1 / g2048, 1) if genai else None,
                    round(g2048 / s2048, 2) if genai else None, "≥ 1.1"])
    b, s = m("ours-long", "ragged_batch_s"), m("ours-long", "ragged_single_s")
    equal = all(r["ragged_equal"] for r in res["ours-long"])
    print(f"ragged batch of {len(RAGGED)} prompts ({RAGGED[0]}..{RAGGED[-1]} tokens) -> {RAGGED_NEW} new: batch "
          f"{len(RAGGED) * RAGGED_NEW / b:.1f} tok/s, one by one {len(RAGGED) * RAGGED_NEW / s:.1f} tok/s, ratio "
          f"{s / b:.2f} (target >= 4); every row's ids equal its single run: {equal}")
    figures.append([f"ragged batch, {len(RAGGED)} prompts -> {RAGGED_NEW} new (tok/s; ratio: batch / one by one)",
                    round(len(RAGGED) * RAGGED_NEW / b, 1), None, round(s / b, 2), f"≥ 4, ids equal: {equal}"])
    record(f"{args.dim}x{args.layers} fp32 model (vocabulary {args.vocab}), our ORT export"
           + (" vs onnxruntime-genai" if genai else ""),
           f"RSS after loading {loaded / mib:.0f} MiB; first token {ours_first:.2f} s"
           + (f" vs genai's {g_first:.2f} s" if genai else "")
           + f"; decode at context {LONG} {1 / s2048:.1f} tok/s" + (f" ({g2048 / s2048:.2f}x genai)" if genai else "")
           + f"; ragged batch {s / b:.2f}x one by one")


if __name__ == "__main__":
    main()
