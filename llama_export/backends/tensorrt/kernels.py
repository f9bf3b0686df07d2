"""Triton kernels for the `llama_export` custom nodes, and the one launch plan per kernel.

Semantics are those of `llama_export.artifact.schema` (references: `llama_export.model.ops`):

    RMSNorm  x [..., D] contiguous, weight [D] (same dtype as x), y like x
             one program per row of D elements; sum of squares accumulated in fp32;
             y = (x * rsqrt(mean(x²) + eps)).to(x.dtype) * weight

    RoPE     x [B, S, H, D] contiguous, cos/sin [P, D/2] fp32 contiguous (the model's tables), start [B]
             int64, y like x
             one program per (b, s, h) row of D elements: b = row // (S*H), s = (row // H) % S, rotated
             by table row start[b] + s; pairs (2i, 2i+1) when interleaved, (i, i + D/2) otherwise
             (rotate-half); fp32 math. A position outside [0, P) (which the contract forbids:
             start[b] + S <= capacity <= P) is never read: that row's output is NaN.

Kernel parameter order is (input pointers..., int32 scalars..., output pointers..., constexprs): that is
the order TensorRT's AOT plugin path passes arguments (inputs, then `extra_args`, then outputs; TensorRT
Python API, `tensorrt.plugin.aot_impl`, "Returns: extra_args"), so the same PTX serves both paths.

`rms_norm_launch` / `rope_launch` are the only places that decide grid, num_warps, constexprs and scalar
arguments. The Python helpers (`rms_norm`, `rope`) and the TensorRT plugin's `aot_impl` both call them;
they accept symbolic sizes (TensorRT `SymInt32` expressions) for the dynamic dimensions, using only `*`.

Importing this module imports triton but never tensorrt. Under `TRITON_INTERPRET=1` (set before import)
the kernels run on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from llama_export import dtypes

# torch dtype -> Triton pointer element spelling (also used for the AOT signature): the Precision values.
TRITON_DTYPES: dict[torch.dtype, str] = {d.torch: d.precision for d in dtypes.FLOAT_TYPES if d.precision}
SUPPORTED = tuple(TRITON_DTYPES.values())
START_DTYPE = "i64"  # RoPE's start [B]: int64, as the graph contract has it (TensorRT plugins take INT64 I/O)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / D + EPS)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # Normalise in fp32, round to the I/O dtype, then scale in the I/O dtype: as rms_norm_reference.
    y = (x * inv_rms).to(w.dtype) * w
    tl.store(y_ptr + row * D + cols, y, mask=mask)


@triton.jit
def rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    start_ptr,
    seq,
    n_pos,
    y_ptr,
    H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = (b * S + s) * H + h
    bs = row // H
    pos = tl.load(start_ptr + bs // seq) + bs % seq  # start[b] + s (int64)
    in_table = (pos >= 0) & (pos < n_pos)
    i = tl.arange(0, BLOCK_HALF)
    mask = i < HALF
    if INTERLEAVED:  # Meta: pairs (2i, 2i+1)
        a_off = 2 * i
        b_off = 2 * i + 1
    else:  # Hugging Face rotate-half: pairs (i, i + D/2)
        a_off = i
        b_off = i + HALF
    base = row * (2 * HALF)
    a = tl.load(x_ptr + base + a_off, mask=mask, other=0.0)
    b = tl.load(x_ptr + base + b_off, mask=mask, other=0.0)
    row_ptr = tl.where(in_table, pos, 0) * HALF + i  # row 0 stands in for a position outside the table
    c = tl.where(in_table, tl.load(cos_ptr + row_ptr, mask=mask, other=0.0), float("nan"))
    s = tl.where(in_table, tl.load(sin_ptr + row_ptr, mask=mask, other=0.0), float("nan"))
    af = a.to(tl.float32)
    bf = b.to(tl.float32)
    tl.store(y_ptr + base + a_off, (af * c - bf * s).to(a.dtype), mask=mask)
    tl.store(y_ptr + base + b_off, (af * s + bf * c).to(a.dtype), mask=mask)


KERNELS = {"rms_norm_kernel": rms_norm_kernel, "rope_kernel": rope_kernel}


@dataclass(frozen=True)
class LaunchPlan:
    """How to launch one kernel: the single description shared by the Python and AOT paths.

    `grid` entries and scalar values are ints, or symbolic TensorRT expressions in the plugin.
    `inputs` / `outputs` map pointer parameter names to Triton element types ("fp16", ...).
    """

    kernel: str
    grid: tuple[Any, Any, Any]
    num_warps: int
    inputs: tuple[tuple[str, str], ...]
    scalars: tuple[tuple[str, Any], ...]  # int32 scalars, passed between inputs and outputs
    outputs: tuple[tuple[str, str], ...]
    constexprs: Mapping[str, int | float | bool] = field(default_factory=dict)

    @property
    def block(self) -> tuple[int, int, int]:
        """Threads per block: Triton kernels run `num_warps` warps of 32 (the PTX says `.reqntid`)."""
        return (self.num_warps * 32, 1, 1)

    def signature(self) -> dict[str, str]:
        """Triton `ASTSource` signature: every parameter in kernel order."""
        sig = {n: "*" + t for n, t in self.inputs}
        sig.update({n: "i32" for n, _ in self.scalars})
        sig.update({n: "*" + t for n, t in self.outputs})
        sig.update({n: "constexpr" for n in self.constexprs})
        return sig


def _check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED:
        raise ValueError(f"dtype {dtype!r} is not supported by the llama_export kernels; use one of {SUPPORTED}")


def _num_warps(block: int) -> int:
    # One warp per 256 elements (8 per thread), between 1 and 16 warps.
    return max(1, min(16, block // 256))


def _product(dims: Sequence[Any]) -> Any:
    # Starts from the first element so symbolic dims only ever see `sym * x`, never `1 * sym`.
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out


def rms_norm_launch(shape: Sequence[Any], dtype: str, eps: float) -> LaunchPlan:
    """Launch plan for RMSNorm over x of `shape` ([..., D], D a concrete int)."""
    _check_dtype(dtype)
    d = shape[-1]
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"RMSNorm needs a static positive last dimension, got {d!r}")
    block = triton.next_power_of_2(d)
    rows = _product(shape[:-1]) if len(shape) > 1 else 1
    return LaunchPlan(
        kernel="rms_norm_kernel",
        grid=(rows, 1, 1),
        num_warps=_num_warps(block),
        inputs=(("x_ptr", dtype), ("w_ptr", dtype)),
        scalars=(),
        outputs=(("y_ptr", dtype),),
        constexprs={"D": d, "BLOCK_D": block, "EPS": float(eps)},
    )


def rope_launch(shape: Sequence[Any], dtype: str, interleaved: bool, table_rows: Any) -> LaunchPlan:
    """Launch plan for RoPE over x of `shape` [B, S, H, D] (H and D concrete ints, D even) with tables of
    `table_rows` positions (P; may be symbolic)."""
    _check_dtype(dtype)
    if len(shape) != 4:
        raise ValueError(f"RoPE takes x as [batch, seq, heads, head_dim], got rank {len(shape)}")
    b, s, h, d = shape
    if not isinstance(h, int) or not isinstance(d, int) or d <= 0 or d % 2:
        raise ValueError(f"RoPE needs static heads and an even static head_dim, got H={h!r}, D={d!r}")
    half = d // 2
    block = triton.next_power_of_2(half)
    return LaunchPlan(
        kernel="rope_kernel",
        grid=(_product((b, s, h)), 1, 1),
        num_warps=_num_warps(block),
        inputs=(("x_ptr", dtype), ("cos_ptr", "fp32"), ("sin_ptr", "fp32"), ("start_ptr", START_DTYPE)),
        scalars=(("seq", s), ("n_pos", table_rows)),
        outputs=(("y_ptr", dtype),),
        constexprs={"H": h, "HALF": half, "BLOCK_HALF": block, "INTERLEAVED": bool(interleaved)},
    )


def launch(plan: LaunchPlan, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
    """Launch `plan` with Triton's Python launcher (on the current CUDA stream, or the interpreter)."""
    if plan.grid[0] == 0:
        return  # CUDA rejects an empty grid; there is nothing to compute
    args = [*inputs, *(v for _, v in plan.scalars), *outputs]
    KERNELS[plan.kernel][plan.grid](*args, **plan.constexprs, num_warps=plan.num_warps)


def _dtype_name(t: Tensor) -> str:
    try:
        return TRITON_DTYPES[t.dtype]
    except KeyError:
        raise ValueError(f"dtype {t.dtype} is not supported; use one of {list(TRITON_DTYPES)}") from None


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None) -> Tensor:
    """RMSNorm of x [..., D] with weight [D] (same dtype), like `rms_norm_reference`."""
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [{x.shape[-1]}] {x.dtype}, got {list(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x) if out is None else out
    launch(rms_norm_launch(tuple(x.shape), _dtype_name(x), eps), (x, weight.contiguous()), (y,))
    return y


def rope(x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, interleaved: bool, *,
         out: Tensor | None = None) -> Tensor:
    """RoPE of x [B, S, H, D] with cos/sin [P, D/2] fp32 and start [B] int64, like `rope_reference`."""
    if x.dim() != 4 or cos.dim() != 2 or cos.shape[1] != x.shape[3] // 2 or cos.shape != sin.shape:
        raise ValueError(
            f"RoPE wants x [B, S, H, D] and cos/sin [P, D/2]; got {list(x.shape)}, {list(cos.shape)}, "
            f"{list(sin.shape)}"
        )
    if start.shape != x.shape[:1] or start.dtype != torch.int64:
        raise ValueError(f"RoPE wants start [{x.shape[0]}] int64, got {list(start.shape)} {start.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x) if out is None else out
    plan = rope_launch(tuple(x.shape), _dtype_name(x), interleaved, cos.shape[0])
    launch(plan, (x, cos.float().contiguous(), sin.float().contiguous(), start.contiguous()), (y,))
    return y
