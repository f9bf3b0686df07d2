#!/usr/bin/env python3
"""A warm engine's own cost: the time a request spends outside the model's forwards, and whether memory
stays flat over many requests (the targets: overhead <= 1 ms a request, RSS after 1,000 requests
within 5 % of RSS after 10).

    python benchmarks/bench_engine.py [--artifacts DIR] [--requests 1000] [--record benchmarks/results]

The engine is opened once (`llama_export.engine.open_engine`) on an ONNX Runtime export (default: the
built-in demo model exported at TP=1 fp32 into a temporary folder: its forwards take about a
millisecond, so whatever the engine adds shows). The model's forwards are timed where the engine calls
them (`Engine.ranks`, wrapped); everything else between a request's submit and its result is the
engine's: validation, queueing, the hand-off to its thread and back, sampling, per-request state.

1. Overhead: --sequential requests one at a time (prompt 8-32 ids, greedy), each request's wall time
   minus the forwards it caused, p50/p99, and the CPU time spent outside the forwards (the engine
   thread's CPU clock less its CPU inside the forwards, plus the caller's; load does not inflate it): with 1 new token (the request's fixed cost: submit, admit,
   prefill's bookkeeping, sampling once, finish, the hand-off back) and with 9 (the difference / 8 is
   what a further token costs). Then waves of --concurrent requests in flight (8 new tokens; the wall
   of a wave minus its forwards, per request).
2. Memory: --requests requests in waves of --concurrent (prompts 16-160 ids, 1-64 new tokens, half of
   them sampled with a seed), RSS after the first 10 and after every further tenth of them; how many ONNX Runtime
   sessions were created while they ran (a warm engine creates none).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_common import add_record_arguments, table, write_record  # noqa: E402


class TimedRanks:
    """`Engine.ranks` with the time of each forward added up (the engine's thread calls it)."""

    def __init__(self, ranks) -> None:
        self.ranks = ranks
        self.seconds = 0.0
        self.cpu = 0.0  # the calling (engine) thread's CPU seconds inside the forwards
        self.calls = 0

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.ranks(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu += time.thread_time() - c0
            self.calls += 1


class EngineCPU:
    """CPU seconds spent outside the forwards: the engine thread's (its CPU clock, less what it spent
    inside the forwards) plus the caller's own (this thread's). Unlike wall time, this does not grow
    when other processes load the machine."""

    def __init__(self, engine, timed: TimedRanks) -> None:
        self.clock = time.pthread_getcpuclockid(engine._thread.ident)
        self.timed = timed

    def now(self) -> float:
        return time.clock_gettime(self.clock) - self.timed.cpu + time.thread_time()

    def __getattr__(self, name):
        return getattr(self.ranks, name)


def export_demo(out: Path, threads: int) -> Path:
    subprocess.run([sys.executable, "-m", "llama_export.cli", "export", "--tp", "1", "--out", str(out), "--name",
                    "demo", "--no-validate", "--no-progress", "--threads", str(threads)], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return out / "demo" / "tp1-fp32"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def overhead_one_at_a_time(engine, timed: TimedRanks, prompts: list[list[int]], new: int) -> tuple[list, list]:
    """Per request: (wall - forwards) in ms, and the CPU ms outside the forwards (`EngineCPU`)."""
    per_request, cpu = [], []
    clock = EngineCPU(engine, timed)
    for p in prompts:
        f0 = timed.seconds
        t0, c0 = time.perf_counter(), clock.now()
        engine.submit(engine.request(p, max_tokens=new)).result(timeout=600)
        wall = time.perf_counter() - t0
        cpu.append((clock.now() - c0) * 1e3)
        per_request.append((wall - (timed.seconds - f0)) * 1e3)
    return per_request, cpu


def overhead_in_waves(engine, timed: TimedRanks, prompts: list[list[int]], new: int, wave: int) -> list[float]:
    """Per request, in waves of `wave` submitted together: (wave wall - its forwards) / wave, in ms."""
    out = []
    for i in range(0, len(prompts) - wave + 1, wave):
        f0 = timed.seconds
        t0 = time.perf_counter()
        handles = [engine.submit(engine.request(p, max_tokens=new)) for p in prompts[i:i + wave]]
        for h in handles:
            h.result(timeout=600)
        out.append(((time.perf_counter() - t0) - (timed.seconds - f0)) * 1e3 / wave)
    return out


def rss_over_requests(engine, n: int, wave: int, vocab: int, rng: random.Random) -> dict[int, int]:
    """RSS after the first 10 requests and after every further tenth of `n`, each measured after a
    garbage collection: {requests done: RSS bytes}."""
    from llama_export.engine.generate import SamplingConfig

    proc = psutil.Process()
    marks = sorted({10, *(n * k // 10 for k in range(1, 11))})
    done, rss = 0, {}
    while done < n:
        handles = []
        for j in range(min(wave, n - done)):
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(16, 160))]
            sampling = SamplingConfig(temperature=0.8, top_p=0.95, seed=done + j) if j % 2 else SamplingConfig()
            handles.append(engine.submit(engine.request(prompt, max_tokens=rng.randint(1, 64), sampling=sampling)))
        for h in handles:
            h.result(timeout=600)
        done += len(handles)
        while marks and done >= marks[0]:
            gc.collect()
            rss[marks.pop(0)] = proc.memory_info().rss
    return rss


def count_sessions():
    """A counter of onnxruntime.InferenceSession constructions from now on."""
    import onnxruntime as ort

    counter = {"n": 0}
    original = ort.InferenceSession.__init__

    def counting(self, *a, **k):
        counter["n"] += 1
        original(self, *a, **k)

    ort.InferenceSession.__init__ = counting
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, help="a TP=1 ORT export (default: the demo model, exported now)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--sequential", type=int, default=200, help="requests timed one at a time")
    ap.add_argument("--concurrent", type=int, default=8, help="requests in flight in the waves (and slots)")
    ap.add_argument("--threads", type=int, default=2)
    add_record_arguments(ap)
    args = ap.parse_args()
    load_at_start = os.getloadavg()[0]

    from llama_export.config import Backend
    from llama_export.engine import open_engine
    from llama_export.runner.source import ModelSource

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifacts or export_demo(Path(tmp), args.threads)
        source = ModelSource(Backend.ORT, artifacts=artifacts).resolve()
        vocab = source.config.vocab_size
        with open_engine(source, slots=args.concurrent, threads=args.threads) as engine:
            timed = TimedRanks(engine.ranks)
            engine.ranks = timed
            rng = random.Random(0)
            prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(8, 32))] for _ in range(args.sequential)]
            overhead_one_at_a_time(engine, timed, prompts[:10], 8)  # warm-up
            sessions = count_sessions()
            seq1, cpu1 = overhead_one_at_a_time(engine, timed, prompts, 1)
            seq, cpu9 = overhead_one_at_a_time(engine, timed, prompts, 9)
            waves = overhead_in_waves(engine, timed, prompts, 8, args.concurrent)
            rss = rss_over_requests(engine, args.requests, args.concurrent, vocab, random.Random(1))
            new_sessions = sessions["n"]

    ms = lambda x: round(x, 3)  # noqa: E731
    per_token = (statistics.median(cpu9) - statistics.median(cpu1)) / 8
    rows = [["one at a time, 1 token", len(seq1), ms(statistics.median(seq1)), ms(pct(seq1, 0.99)),
             ms(statistics.median(cpu1))],
            ["one at a time, 9 tokens", len(seq), ms(statistics.median(seq)), ms(pct(seq, 0.99)),
             ms(statistics.median(cpu9))],
            [f"{args.concurrent} in flight, 8 tokens", len(waves) * args.concurrent, ms(statistics.median(waves)),
             ms(pct(waves, 0.99)), None]]
    rss_10, rss_n = rss[10], rss[max(rss)]
    ratio = rss_n / rss_10
    print(f"{'requests':<24} {'n':>5} {'wall ms p50':>12} {'p99':>7} {'CPU ms p50':>11}")
    for r in rows:
        print(f"{r[0]:<24} {r[1]:>5} {r[2]:>12.3f} {r[3]:>7.3f} {'' if r[4] is None else f'{r[4]:.3f}':>11}")
    print(f"each further token adds {per_token:.3f} CPU ms outside the forwards (p50 of 9 tokens - p50 of 1, / 8)")
    print(f"RSS after 10 requests {rss_10 / 2**20:.1f} MiB, after {args.requests}: {rss_n / 2**20:.1f} MiB "
          f"= {ratio:.3f}x; ONNX Runtime sessions created while serving: {new_sessions}")
    print("RSS MiB by requests done: " + ", ".join(f"{k}: {v / 2**20:.1f}" for k, v in rss.items()))
    if args.record:
        mem = [[k, round(v / 2**20, 1), round(v / rss_10, 3)] for k, v in rss.items()]
        write_record(args.record, benchmark="bench_engine.py", load_at_start=load_at_start, notes=args.record_note,
                     title=f"engine overhead outside the forwards and RSS over {args.requests} requests on "
                           f"{'the demo model' if args.artifacts is None else args.artifacts} (ORT, TP=1)",
                     summary=(f"a 1-token request: {ms(statistics.median(cpu1))} CPU ms outside the forwards "
                              f"(p50, one at a time), each further token {per_token:.3f}; RSS after {args.requests} requests {ratio:.3f}x after 10; "
                              f"{new_sessions} sessions created while serving"),
                     tables=[table(["requests", "n", "wall ms outside forwards p50", "p99", "CPU ms outside forwards p50"], rows,
                                   "Time a request spends outside the model's forwards"),
                             table(["after requests", "RSS MiB", "vs after 10"], mem, "Resident memory")])


if __name__ == "__main__":
    main()
