#!/usr/bin/env python3
"""Serving under load: N concurrent streaming clients over loopback against `llama-export serve`, and
beside it (optional) llama.cpp's `llama-server` on the same weights, and our offline ragged batch
(`run --batch`'s loop on the same prompts) as the upper bound. Ratios, not absolute figures: the
machine's speed moves between runs, so every system is measured in the same run, rounds interleaved.

    python benchmarks/bench_serve.py --artifacts graphs/bench/tp1-fp32 --clients 1 4 16 --requests 32 \
        [--llama-server PATH/llama-server --gguf MODEL.gguf] [--rounds 2]

Each request: a prompt of random token ids (lengths uniform in --prompt-range, seeded, different per
round so that no prompt cache helps) and --max-tokens-range new tokens (ignore_eos where the server has
it; `max_tokens` either way), greedy, streamed. Reported per system and client count: output tok/s
(generated tokens / wall time of the whole load), requests/s, time to first token and inter-token
latency p50/p99 (from the SSE events as the client receives them). --record DIR also writes the table
as a JSON record (benchmarks/report.py turns the records into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import add_record_arguments, table, write_record  # noqa: E402


def start_ours(args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "llama_export.cli", "serve", "--backend", "ort", "--artifacts", str(args.artifacts),
           "--port", "0", "--max-batch", str(max(args.clients)), "--threads", str(args.threads),
           "--model-name", "bench"]
    if args.cache_capacity:
        cmd += ["--cache-capacity", str(args.cache_capacity)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stderr.readline()
    m = re.search(r":(\d+)/v1", line)
    if not m:
        raise SystemExit(f"llama-export serve did not start: {line}{proc.stderr.read()}")
    return proc, int(m.group(1))


def start_llama_server(args) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([args.llama_server, "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(max(args.clients)), "-t", str(args.threads), "-c",
                             str(max(args.clients) * (args.cache_capacity or 1024)), "--no-cache-prompt"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama-server did not become healthy within 300 s")


def one_request(port: int, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times = []
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("choices") and (event["choices"][0].get("text") or event["choices"][0].get("finish_reason") is None):
                    times.append(time.perf_counter() - t0)
    return {"ttft": times[0] if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": len(times), "end": time.perf_counter() - t0}


def load(port: int, model: str, clients: int, requests: list[tuple[list[int], int]]) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: one_request(port, model, *r), requests))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "req_s": len(results) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(gaps, 0.5),
            "itl_p99": pct(gaps, 0.99), "wall": wall}


def offline(args, requests) -> dict:
    """Our offline ragged batch of the same prompts, in its own process: the generation loop of `run --batch`."""
    code = f"""
import json, sys, time
import numpy as np
from llama_export.artifact.manifest import load_manifest
from llama_export.backends import open_backend
from llama_export.config import Backend
from llama_export.engine.batch import generate
from llama_export.engine.generate import pad_prompts
from llama_export.parallel.comm import LocalComm
from llama_export.runner.stitch import empty_cache, segmented_step
reqs = json.loads(sys.argv[1]); path = {str(args.artifacts)!r}
m = load_manifest(path); be = open_backend(Backend.ORT, m, path, rank=0, device='cpu', threads={args.threads})
rows = [r[0] for r in reqs]; new = max(r[1] for r in reqs)
prompt, lengths = pad_prompts(rows)
cache = empty_cache(m, 0, len(rows), int(lengths.max()) + new, backend=be)
t0 = time.perf_counter()
out = generate(segmented_step(m, be, comm=LocalComm()), prompt, cache, max_new_tokens=new, prompt_lengths=lengths)
wall = time.perf_counter() - t0
print(json.dumps({{"tok_s": sum(r[1] for r in reqs) / wall, "wall": wall}}))
"""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(requests)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _r(x: float, digits: int) -> float | None:
    """`x` rounded for the record; None where nothing was measured (no token came back)."""
    return None if x != x else round(x, digits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True, help="an export (ours, served on ONNX Runtime)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary (optional peer)")
    ap.add_argument("--gguf", type=Path, help="the same weights as a GGUF, for --llama-server")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=[16, 512])
    ap.add_argument("--max-tokens-range", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--cache-capacity", type=int, default=None, help="tokens per slot (default: prompt + new max)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=None, help="token ids are drawn below this (default: the export's)")
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    if bool(args.llama_server) != bool(args.gguf):
        ap.error("--llama-server and --gguf go together")
    vocab = args.vocab or json.loads((args.artifacts / "manifest.json").read_text())["model"]["vocab_size"]
    args.cache_capacity = args.cache_capacity or args.prompt_range[1] + args.max_tokens_range[1]
    systems = {"llama-export serve": start_ours(args)}
    if args.llama_server:
        systems["llama-server"] = start_llama_server(args)
    results: dict[tuple[str, int], list[dict]] = {}
    offline_runs = []
    try:
        for rnd in range(args.rounds):
            rng = random.Random(1000 + rnd)
            reqs = [([rng.randrange(1, vocab) for _ in range(rng.randint(*args.prompt_range))],
                     rng.randint(*args.max_tokens_range)) for _ in range(args.requests)]
            offline_runs.append(offline(args, reqs))
            for clients in args.clients:
                for name, (_, port) in systems.items():
                    r = load(port, "bench", clients, reqs)
                    results.setdefault((name, clients), []).append(r)
                    print(f"round {rnd + 1} {name:<20} {clients:>3} clients: {r['tok_s']:7.1f} tok/s, "
                          f"TTFT p50 {r['ttft_p50']:.2f} s", flush=True)
    finally:
        for proc, _ in systems.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    bound = statistics.median(r["tok_s"] for r in offline_runs)
    print(f"\noffline ragged batch (upper bound): {bound:.1f} tok/s (median of {len(offline_runs)})")
    print(f"{'system':<20} {'clients':>7} {'tok/s':>8} {'vs batch':>8} {'req/s':>6} {'TTFT p50':>9} {'p99':>6} "
          f"{'ITL p50':>8} {'p99':>6}")
    rows = []
    for (name, clients), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:<20} {clients:>7} {med(runs, 'tok_s'):8.1f} {med(runs, 'tok_s') / bound:8.2f} "
              f"{med(runs, 'req_s'):6.2f} {med(runs, 'ttft_p50'):9.2f} {med(runs, 'ttft_p99'):6.2f} "
              f"{med(runs, 'itl_p50') * 1e3:7.0f}ms {med(runs, 'itl_p99') * 1e3:5.0f}ms")
        rows.append([name, clients, _r(med(runs, "tok_s"), 1), _r(med(runs, "tok_s") / bound, 2),
                     _r(med(runs, "req_s"), 2), _r(med(runs, "ttft_p50"), 2), _r(med(runs, "ttft_p99"), 2),
                     _r(med(runs, "itl_p50") * 1e3, 0), _r(med(runs, "itl_p99") * 1e3, 0)])
    if args.record:
        top = max(args.clients)
        ours = next((r for r in rows if r[0] == "llama-export serve" and r[1] == top), None)
        write_record(args.record, benchmark="bench_serve.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"{args.requests} streaming requests against {args.artifacts}, clients "
                           f"{' '.join(map(str, args.clients))}" + (", beside llama-server" if args.llama_server else ""),
                     summary=(f"{top} clients: {ours[2]} output tok/s = {ours[3]}x the offline batch, TTFT p50 "
                              f"{ours[5]} s") if ours else "",
                     tables=[table(["system", "clients", "output tok/s", "vs offline batch", "req/s", "TTFT p50 s",
                                    "TTFT p99 s", "inter-token p50 ms", "inter-token p99 ms"], rows,
                                   title=f"offline ragged batch (upper bound): {bound:.1f} tok/s; {args.rounds} "
                                         f"round(s), medians; prompts {args.prompt_range[0]}-{args.prompt_range[1]} "
                                         f"ids, {args.max_tokens_range[0]}-{args.max_tokens_range[1]} new; "
                                         f"{args.threads} threads")])
    if args.llama_server:
        for clients in args.clients:
            ours, peer = results[("llama-export serve", clients)], results[("llama-server", clients)]
            print(f"{clients:>3} clients: ours / llama-server output tok/s {med(ours, 'tok_s') / med(peer, 'tok_s'):.2f}x, "
                  f"TTFT p50 {med(ours, 'ttft_p50') / med(peer, 'ttft_p50'):.2f}x")


if __name__ == "__main__":
    main()
