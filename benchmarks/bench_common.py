"""What the generation benchmarks share: the synthetic model's shape, its random weights, the
memory-bandwidth measurement their decode bounds divide by, and running each step or system in its own
process (so its peak RSS is its own): `run_child`/`child_main` for a script's steps, `run_worker` for
peers_worker.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Bytes per weight a decode step reads, by precision class: fp32, and ggml's 32-weight blocks with an
# fp16 scale (q8_0: 34 bytes, q4_0: 18 bytes per block), the densest layout of each class measured here.
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 34 / 32, "int4": 18 / 32}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """--dim --layers --heads --vocab (default: the 134M-parameter model of the benchmarks)."""
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)


def model_config(args, *, max_seq_len: int):
    """MHA, SwiGLU hidden size as Meta derives it with multiple_of 256."""
    from llama_export.config import ModelConfig, meta_ffn_hidden_dim

    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                       vocab_size=args.vocab, hidden_dim=meta_ffn_hidden_dim(args.dim, 256, None),
                       max_seq_len=max_seq_len)


def random_state(cfg, seed: int = 0) -> dict:
    """Random weights by Meta name and layout: N(0, 0.02) matrices, unit norm weights."""
    import torch

    from llama_export.model.checkpoint import expected_shapes

    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s))
            for n, s in expected_shapes(cfg).items()}


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second (read + written) of a large out-of-cache tensor copy, best of `repeats`."""
    import torch

    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes_per_token(cfg, precision: str) -> float:
    """Bytes of weights one decode step reads: every layer projection and the output projection (tied
    or not) at the precision's bytes per weight, norms in fp32, one embedding row in fp32."""
    hd = cfg.head_dim
    layer = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim
    projections = cfg.n_layers * layer + cfg.vocab_size * cfg.dim
    return projections * BYTES_PER_WEIGHT[precision] + (2 * cfg.n_layers + 1 + 1) * cfg.dim * 4


def run_worker(worker: str, model: Path, workload: Path, out: Path, threads: int, *,
               python: str = sys.executable, label: str | None = None) -> dict | None:
    """peers_worker.py WORKER MODEL WORKLOAD OUT in a fresh `python` process; its result, or None (with
    the error's last lines printed) when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([python, str(HERE / "peers_worker.py"), worker, str(model), str(workload), str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {label or worker}: failed ({proc.returncode}): {' | '.join(tail)}", flush=True)
        return None
    return json.loads(Path(out).read_text())


def agreement(ids: list[list[int]], ref: list[list[int]]) -> str:
    """'same/total' greedy ids, and where the first difference is."""
    same = sum(a == b for x, y in zip(ids, ref) for a, b in zip(x, y))
    total = sum(len(y) for y in ref)
    first = next((i for x, y in zip(ids, ref) for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
    return f"{same}/{total}" + ("" if first is None else f" (1st diff @{first})")


def peak_rss(field: str = "VmHWM") -> int:
    """Bytes: VmHWM, this process image's high-water mark (ru_maxrss would also count the parent's
    pages as they were at fork, which exec does not reset); `field="VmRSS"`: its resident set now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child_main(steps: dict[str, Callable[[dict], dict]]) -> bool:
    """In a process `run_child` started (`SCRIPT --child STEP ARGS_JSON`): run steps[STEP](args) and print
    its result, plus `seconds` and `peak_rss` (bytes), as one RESULT line. False in any other process."""
    if len(sys.argv) != 4 or sys.argv[1] != "--child":
        return False
    t0 = time.perf_counter()
    res = steps[sys.argv[2]](json.loads(sys.argv[3]))
    res.update(seconds=time.perf_counter() - t0, peak_rss=peak_rss())
    print("RESULT " + json.dumps(res), flush=True)
    return True


def run_child(script: str, step: str, **args) -> dict:
    """`script --child step args` in a fresh process (the repository on PYTHONPATH); the step's result,
    or exit naming the step after printing the end of its output."""
    proc = subprocess.run([sys.executable, script, "--child", step, json.dumps(args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"step {step} {args} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])
