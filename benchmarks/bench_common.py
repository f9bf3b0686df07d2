"""What the generation benchmarks share: the synthetic model's shape, its random weights, and the
memory-bandwidth measurement their decode bounds divide by."""

from __future__ import annotations

import argparse
import time


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
