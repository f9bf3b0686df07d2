"""How far a backend may be from the eager model in the same dtype: defined here once, for the export
check, `compare`, the tests and the GPU scripts."""

from __future__ import annotations

from dataclasses import dataclass

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
