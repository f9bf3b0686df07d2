"""Runs the Triton kernels under TRITON_INTERPRET=1 (set by the caller) against the torch references.

Run as a subprocess by test_kernels_interpret.py so the interpreter flag never leaks into other tests
(Triton reads it when a kernel is decorated). Prints one JSON object: case id -> max violation ratio.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

from llama_export.tolerances import kernel_tolerance

# (op, dtype, shape, interleaved): small shapes, the interpreter is slow. RoPE rows start at ragged
# positions (ROPE_STARTS) in tables of ROPE_TABLE rows, the last row of the table included.
CASES: list[tuple[str, str, tuple[int, ...], bool]] = [
    (op, dt, shape, il)
    for dt in ("float32", "float16")
    for op, shape, il in [
        ("rms_norm", (2, 1, 64), False),
        ("rms_norm", (2, 3, 128), False),
        ("rms_norm", (2, 5, 96), False),
        ("rms_norm", (3, 40), False),
        *[("rope", s, il) for s in [(2, 1, 2, 64), (3, 3, 2, 128), (2, 4, 3, 96), (1, 2, 1, 6)] for il in (True, False)],
    ]
]
ROPE_STARTS = (0, 9, 4)  # start[b] for row b (the first B of them)
ROPE_TABLE = 13  # table rows P; row 1 of the 4-token case reaches position 9 + 4 - 1 = 12 = P - 1


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
            half = shape[3] // 2
            inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
            ang = torch.outer(torch.arange(ROPE_TABLE, dtype=torch.float32), inv)  # the model's tables [P, D/2]
            start = torch.tensor(ROPE_STARTS[: shape[0]], dtype=torch.int64)
            got = kernels.rope(x, ang.cos(), ang.sin(), start, il)
            want = rope_reference(x, ang.cos(), ang.sin(), start, il)
        tol = kernel_tolerance(dt)  # atol = rtol
        err = (got.float() - want.float()).abs()
        bound = tol + tol * want.float().abs()
        results[case_id(case)] = {
            "ratio": float((err / bound).max()),
            "max_abs": float(err.max()),
            "dtype_ok": got.dtype == want.dtype and got.shape == want.shape,
        }
    results["rope-outside-table"] = _outside_table(torch, kernels, rope_reference)
    print(json.dumps(results))
    return 0


def _outside_table(torch, kernels, rope_reference) -> dict[str, object]:
    """A row whose positions run past the table (start[b] + S > P, which the contract forbids): its
    positions inside the table are right, the one outside is NaN (never read from beyond the table)."""
    x = torch.randn(2, 3, 2, 16)
    ang = torch.rand(8, 8) * 6
    start = torch.tensor([5, 6])  # row 0: positions 5..7 fit P = 8; row 1: 6..8 does not
    nan = torch.full((1, 8), float("nan"))  # the reference with a NaN 9th row: what the kernel promises
    want = rope_reference(x, torch.cat([ang.cos(), nan]), torch.cat([ang.sin(), nan]), start, True)
    got = kernels.rope(x, ang.cos(), ang.sin(), start, True)
    tol = kernel_tolerance("float32")
    return {"match": bool(torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True)),
            "nan_tokens": int(got.isnan().flatten(2).any(-1).sum())}


if __name__ == "__main__":
    sys.exit(main())
