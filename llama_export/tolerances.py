"""How far one computation may be from its reference: defined here once, for the export check, `compare`,
the tests and the GPU scripts. Three comparisons, three tables, each keyed by the dtype being checked:

    TOLERANCES        a backend (or TP degree, or the eager model vs `transformers`) against the eager
                      model in the SAME dtype: whole-model logits, and per-segment divergence
    KERNEL_TOLERANCES one plugin kernel (Triton, JIT / AOT / interpreter) against its torch reference
                      op in the same dtype, elementwise
    CROSS_DTYPE_LOGITS_ATOL  the eager model in a dtype on a GPU against the eager model in fp32 on the
                      CPU (scripts/gpu_check_eager.py): a cross-dtype comparison, so looser than
                      TOLERANCES for the same precision
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_export import dtypes
from llama_export.config import Precision


@dataclass(frozen=True)
class Tolerance:
    """How far a backend may be from the eager model in the same dtype.

    logits_atol: max abs error on the final fp32 logits. fp32: different kernels and summation orders
      only (observed ~1e-5 on the demo model, ~2e-6 on the test models). fp16: one rounding of every
      activation (~1e-3 relative) compounded over the layers (observed <= ~2e-2). bf16: 8 mantissa bits.
    divergence_rel: relative error (max abs / max |reference|) of one segment's output above which
      `compare` says the error starts there.
    """

    logits_atol: float
    divergence_rel: float


TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(logits_atol=1e-4, divergence_rel=1e-4),
    Precision.FP16: Tolerance(logits_atol=5e-2, divergence_rel=2e-2),
    Precision.BF16: Tolerance(logits_atol=2.5e-1, divergence_rel=1e-1),
}


# A plugin kernel's output against its torch reference op, elementwise: |got - want| <= tol + tol * |want|
# (torch.allclose with atol = rtol = tol). One op on O(1) values: a few ulps of the dtype (the fp16 ulp at
# 1 is ~1e-3, bf16's ~8e-3), RMSNorm's fp32 accumulation included.
KERNEL_TOLERANCES: dict[Precision, float] = {
    Precision.FP32: 1e-5,
    Precision.FP16: 2e-3,
    Precision.BF16: 1.6e-2,
}


def kernel_tolerance(dtype_name: str) -> float:
    """KERNEL_TOLERANCES of a float dtype named as torch and the manifest name it ("float16")."""
    return KERNEL_TOLERANCES[Precision(dtypes.by_name(dtype_name).precision)]

# Max abs error on the final logits (O(1-10) on the check's model) of the eager model run on a GPU in
# the given dtype against the same weights run in fp32 on the CPU. fp32: CUDA vs CPU kernels (cuBLAS
# split-k, fused attention) only; fp16 / bf16: the dtype's rounding of weights and activations too,
# which TOLERANCES (both sides in the same dtype) does not count.
CROSS_DTYPE_LOGITS_ATOL: dict[Precision, float] = {
    Precision.FP32: 1e-3,
    Precision.FP16: 5e-2,
    Precision.BF16: 3e-1,
}
