"""The custom-node schema: domain `llama_export`, version 1. Semantics are written down once, here.

    RMSNorm(x, weight) -> y          attribute epsilon: float
        x: [..., D] (fp32/fp16/bf16), weight: [D] same dtype as x, y: like x
        y = (x / sqrt(mean(x^2, -1) + epsilon)).to(x.dtype) * weight, normalisation in fp32

    RoPE(x, cos, sin) -> y           attribute interleaved: int (1 = Meta pairs (2i, 2i+1),
                                                               0 = rotate-half pairs (i, i + D/2))
        x: [B, S, H, D] (fp32/fp16/bf16); cos, sin: [S, D/2] fp32 (rows = absolute positions)
        y: like x; each pair (a, b) -> (a*cos - b*sin, a*sin + b*cos), computed in fp32

    AllReduce(x) -> y                attribute world_size: int
        sum over ranks. A marker: never reaches a backend (the partition pass cuts here).

    AllGather(x) -> y                attributes axis: int (non-negative), world_size: int
        concatenation over ranks along `axis`. A marker, like AllReduce.

The torch implementations are `llama_export.model.ops.rms_norm_reference` / `rope_reference`; the
plain-ONNX reference decompositions are in `llama_export.export.reference`.
"""

from __future__ import annotations

DOMAIN = "llama_export"
VERSION = 1

RMS_NORM = "RMSNorm"
ROPE = "RoPE"
ALL_REDUCE = "AllReduce"
ALL_GATHER = "AllGather"

COMPUTE_OPS = (RMS_NORM, ROPE)
COLLECTIVE_OPS = (ALL_REDUCE, ALL_GATHER)

# Symbolic dimension names used on every exported graph's inputs and outputs.
DIM_BATCH = "batch"
DIM_SEQ = "seq"
DIM_PAST = "past"
