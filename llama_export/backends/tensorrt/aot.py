"""Ahead-of-time compilation of the Triton kernels to PTX for explicit targets, no GPU needed.

`compile_plan(plan, arch=90)` compiles the kernel a `LaunchPlan` names (kernels.py) with that plan's
constexprs and num_warps, through Triton's own pipeline (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`, Triton 3.9), and returns an `AotKernel`: PTX text, entry name,
shared memory, block size and the plan's grid. This is exactly what the TensorRT plugin's `aot_impl`
hands to TensorRT (kernel name, PTX, `KernelLaunchParams`, `extra_args`).

Triton >= 3.3 appends two pointer parameters to every kernel entry (global and profile scratch). Our
kernels request no scratch (checked here), so a launcher may pass null for them; `AotKernel.trailing_params`
says how many there are, and `scripts/gpu_check_trt.py` launches the PTX exactly that way.
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
    trailing_params: int  # Triton's scratch pointers after the outputs (pass null)

    @property
    def n_params(self) -> int:
        return self.n_inputs + len(self.scalars) + self.n_outputs + self.trailing_params


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
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": plan.num_warps, "enable_fp_fusion": FP_FUSION})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{plan.kernel} needs Triton scratch memory, which the TensorRT AOT path cannot provide")
    ptx: str = compiled.asm["ptx"]
    n_declared = count_entry_params(ptx, md.name)
    n_ours = len(plan.inputs) + len(plan.scalars) + len(plan.outputs)
    if n_declared < n_ours:
        raise RuntimeError(f"{md.name}: PTX declares {n_declared} parameters, expected at least {n_ours}")
    log.debug("compiled %s for sm_%d: %d warps, %d B shared", md.name, arch, md.num_warps, md.shared)
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
        trailing_params=n_declared - n_ours,
    )


def count_entry_params(ptx: str, entry: str) -> int:
    """Number of `.param` declarations of `.entry <entry>(...)` in PTX text."""
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"PTX has no .entry {entry}")
    return len(re.findall(r"\.param\b", m.group(1)))


def reqntid(ptx: str) -> int | None:
    """The `.reqntid` (required threads per block) the PTX declares, if any."""
    m = re.search(r"\.reqntid\s+(\d+)", ptx)
    return int(m.group(1)) if m else None
