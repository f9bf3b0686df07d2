"""Runs the Triton kernels under TRITON_INTERPRET=1 (set by the caller) against the torch references.

Run as a subprocess by test_kernels_interpret.py so the interpreter flag never leaks into other tests
(Triton reads it when a kernel is decorated). Prints one JSON object: case id -> max violation ratio.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

# (op, dtype, shape, interleaved): small shapes, the interpreter is slow.
CASES: list[tuple[str, str, tuple[int, ...], bool]] = [
    (op, dt, shape, il)
    for dt in ("float32", "float16")
    for op, shape, il in [
        ("rms_norm", (2, 1, 64), False),
        ("rms_norm", (2, 3, 128), False),
        ("rms_norm", (2, 5, 96), False),
        ("rms_norm", (3, 40), False),
        *[("rope", s, il) for s in [(2, 1, 2, 64), (2, 3, 2, 128), (2, 4, 3, 96), (1, 2, 1, 6)] for il in (True, False)],
    ]
]
TOLERANCES = {"float32": 1e-5, "float16": 2e-3}  # atol = rtol


def case_id(case: tuple[str, str, tuple[int, ...], bool]) -> str:
    op, dt, shape, il = case
    layout = "" if op == "rms_norm" else ("-interleaved" if il else "-rotate_half")
    return f"{op}-{dt}-{'x'.join(map(str, shape))}{layout}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import torch

    from llama_export.backends.tensorrt import kernels
    from llama_export.model.ops import rms_norm_reference, rope_reference

    results = {}
    for case in CASES:
        op, dt, shape, il = case
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
        x = torch.randn(shape, generator=g).to(dtype)
        if op == "rms_norm":
            w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
            got, want = kernels.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
        else:
            seq, half = shape[1], shape[3] // 2
            past = 3  # rows are absolute positions past .. past + seq - 1
            inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
            ang = torch.outer(torch.arange(past, past + seq, dtype=torch.float32), inv)
            # The kernel takes the rows of the step's positions ([S, D/2]): the reference at start 0 with
            # those rows as its table.
            start = torch.zeros(shape[0], dtype=torch.int64)
            got, want = kernels.rope(x, ang.cos(), ang.sin(), il), rope_reference(x, ang.cos(), ang.sin(), start, il)
        tol = TOLERANCES[dt]
        err = (got.float() - want.float()).abs()
        bound = tol + tol * want.float().abs()
        results[case_id(case)] = {
            "ratio": float((err / bound).max()),
            "max_abs": float(err.max()),
            "dtype_ok": got.dtype == want.dtype and got.shape == want.shape,
        }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
