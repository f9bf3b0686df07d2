"""Ahead-of-time compilation of the Triton kernels to PTX for explicit targets, no GPU needed.

`compile_plan(plan, arch=90)` compiles the kernel a `LaunchPlan` names (kernels.py) with that plan's
constexprs and num_warps, through Triton's own pipeline (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`, Triton 3.9), and returns an `AotKernel`: PTX text, entry name,
shared memory, block size and the plan's grid. This is exactly what the TensorRT plugin's `aot_impl`
hands to TensorRT (kernel name, PTX, `KernelLaunchParams`, `extra_args`).

The PTX entry takes exactly the parameters TensorRT's AOT launcher passes: the input pointers, the
int32 extra args, the output pointers (`tensorrt.plugin.aot_impl`, "extra_args ... located after the
tensor inputs and before the tensor outputs"). Triton >= 3.3 appends two more pointer parameters to
every entry (global and profile scratch); TensorRT does not pass them. Our kernels request no scratch
(checked here), and `drop_unused_params` removes the trailing declarations only after proving that
the PTX never names them (a `.param` can only be read through its name), so launching with fewer
arguments is no longer undefined behaviour. The rewritten PTX is assembled with Triton's `ptxas` for
sm_80 / sm_90 in the tests.

    .entry rope_kernel(                          .entry rope_kernel(
        .param .u64 .ptr .global ..._param_0,        .param .u64 .ptr .global ..._param_0,  x
        .param .u64 .ptr .global ..._param_1,        .param .u64 .ptr .global ..._param_1,  cos
        .param .u64 .ptr .global ..._param_2,        .param .u64 .ptr .global ..._param_2,  sin
        .param .u64 .ptr .global ..._param_3,  ─►    .param .u64 .ptr .global ..._param_3,  start
        .param .u32 ..._param_4,                     .param .u32 ..._param_4,               seq
        .param .u32 ..._param_5,                     .param .u32 ..._param_5,               n_pos
        .param .u64 .ptr .global ..._param_6,        .param .u64 .ptr .global ..._param_6   y
        .param .u64 .ptr .global ..._param_7,    )
        .param .u64 .ptr .global ..._param_8
    )
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llama_export.backends.tensorrt.kernels import KERNELS, LaunchPlan

log = logging.getLogger(__name__)

ARCHS = (80, 90)  # the targets tested here: Ampere (A100) and Hopper (H100/H200); any >= 80 compiles
# Triton 3.9 fuses a*b+c into FMA by default (its JIT launches do the same); stated explicitly so the
# PTX does not change when Triton 3.10 flips that default.
FP_FUSION = True
# PTX ISA 8.8 for every target: the newest the sm_80 assembler inside the triton wheel (CUDA 12.9)
# accepts, and old enough for any CUDA 13 driver to JIT. Left to itself Triton 3.9 writes ISA 9.4 for
# sm_90, which a driver older than CUDA 13.4 refuses to load.
PTX_VERSION = 88
POINTER, INT32 = ".u64", ".u32"  # PTX parameter types of a Triton pointer and an i32 argument


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel and how to launch it (grid entries may be symbolic, like the plan's)."""

    name: str  # PTX entry name
    ptx: str
    arch: int
    num_warps: int
    shared_mem: int  # dynamic shared memory, bytes
    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    scalars: tuple[tuple[str, Any], ...]  # int32 args between the input and output pointers
    n_inputs: int
    n_outputs: int
    dropped_params: tuple[str, ...]  # Triton's unused trailing scratch parameters, removed from the entry


def expected_param_types(n_inputs: int, n_scalars: int, n_outputs: int) -> list[str]:
    """PTX parameter types, in order, of an entry launched the way TensorRT's AOT launcher does."""
    return [POINTER] * n_inputs + [INT32] * n_scalars + [POINTER] * n_outputs


def compile_plan(plan: LaunchPlan, *, arch: int = 90) -> AotKernel:
    """Compile `plan`'s kernel for sm_`arch` and describe its launch. CPU only; takes about a second."""
    if arch < 80:
        raise ValueError(f"arch sm_{arch} is below sm_80 (bf16 and this project's kernels need Ampere or newer)")
    fn = KERNELS[plan.kernel]
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(
            "the Triton kernels were created under TRITON_INTERPRET=1 and cannot be compiled; "
            "run ahead-of-time compilation in a process without TRITON_INTERPRET"
        )
    src = ASTSource(fn=fn, signature=plan.signature(), constexprs=dict(plan.constexprs))
    options = {"num_warps": plan.num_warps, "enable_fp_fusion": FP_FUSION, "ptx_version": PTX_VERSION}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{plan.kernel} needs Triton scratch memory, which the TensorRT AOT path cannot provide")
    want = expected_param_types(len(plan.inputs), len(plan.scalars), len(plan.outputs))
    ptx, dropped = drop_unused_params(compiled.asm["ptx"], md.name, keep=len(want))
    got = [t for t, _ in entry_params(ptx, md.name)]
    if got != want:
        raise RuntimeError(f"{md.name}: PTX parameter types {got} differ from the launch order {want}")
    log.debug("compiled %s for sm_%d: %d warps, %d B shared, dropped %s", md.name, arch, md.num_warps, md.shared,
              dropped)
    return AotKernel(
        name=md.name,
        ptx=ptx,
        arch=arch,
        num_warps=md.num_warps,
        shared_mem=md.shared,
        grid=plan.grid,
        block=plan.block,
        scalars=plan.scalars,
        n_inputs=len(plan.inputs),
        n_outputs=len(plan.outputs),
        dropped_params=dropped,
    )


def _entry_header(ptx: str, entry: str) -> re.Match[str]:
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"PTX has no .entry {entry}")
    return m


def entry_params(ptx: str, entry: str) -> list[tuple[str, str]]:
    """(type, name) of each `.param` of `.entry <entry>(...)`, in order; type is ".u64", ".u32", ..."""
    params = []
    for decl in filter(None, (p.strip() for p in _entry_header(ptx, entry).group(1).split(","))):
        m = re.fullmatch(r"\.param\s+(\.\w+)\b.*?(\S+)", decl, re.S)
        if m is None:
            raise ValueError(f"cannot read PTX parameter declaration {decl!r} of {entry}")
        params.append((m.group(1), m.group(2)))
    return params


def drop_unused_params(ptx: str, entry: str, *, keep: int) -> tuple[str, tuple[str, ...]]:
    """Remove the parameters of `entry` after the first `keep`, proving first that none is used.

    A PTX `.param` is only reachable through its name (`ld.param [name]`, `mov ... name`), so a name that
    appears nowhere but in its own declaration is unused. Raises ValueError otherwise. Returns the new
    PTX and the names removed.
    """
    header = _entry_header(ptx, entry)
    params = entry_params(ptx, entry)
    if len(params) < keep:
        raise ValueError(f"{entry}: PTX declares {len(params)} parameters, fewer than the {keep} launched")
    dropped = tuple(name for _, name in params[keep:])
    rest = ptx[: header.start()] + ptx[header.end():]
    used = [n for n in dropped if re.search(r"(?<![\w$])" + re.escape(n) + r"(?![\w$])", rest)]
    if used:
        raise ValueError(f"{entry}: trailing parameters {used} are used by the kernel and cannot be dropped")
    decls = [p.strip() for p in header.group(1).split(",") if p.strip()][:keep]
    new_header = ptx[header.start():header.start(1)] + "\n\t" + ",\n\t".join(decls) + "\n)"
    return ptx[: header.start()] + new_header + ptx[header.end():], dropped


def reqntid(ptx: str) -> int | None:
    """The `.reqntid` (required threads per block) the PTX declares, if any."""
    m = re.search(r"\.reqntid\s+(\d+)", ptx)
    return int(m.group(1)) if m else None
