"""Pass: verify a rank graph or segment (no rewriting).

- `onnx.checker.check_model(full_check=True)`: structure, opset/IR versions, the custom ops against
  their registered schemas (`schema.register_onnx_schemas`), and strict shape inference.
- The custom nodes are where they should be: one RMSNorm per norm, one RoPE per q/k, and none of the
  ops a decomposed RMSNorm or RoPE would leave behind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from llama_export.config import ModelConfig
from llama_export.errors import ArtifactError
from llama_export.export import schema

# Ops that only a decomposed RMSNorm (ReduceMean, Sqrt, Pow, Reciprocal) or RoPE (Sin, Cos) would use.
DECOMPOSITION_OPS = frozenset({"ReduceMean", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos"})


def check(model: onnx.ModelProto | Path) -> None:
    """onnx.checker full check; pass a path for graphs over 2 GB (external data)."""
    schema.register_onnx_schemas()
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def custom_node_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == schema.DOMAIN)


def check_rank_graph(model: onnx.ModelProto, cfg: ModelConfig, tp: int) -> None:
    """The full rank graph (before partitioning) holds exactly the custom nodes the model implies."""
    counts = custom_node_counts(model)
    want = {schema.RMS_NORM: 2 * cfg.n_layers + 1, schema.ROPE: 2 * cfg.n_layers}
    if tp > 1:
        want |= {schema.ALL_REDUCE: 2 * cfg.n_layers, schema.ALL_GATHER: 2}
    got = {k: counts.get(k, 0) for k in want}
    extra = set(counts) - set(want)
    if got != want or extra:
        raise ArtifactError(f"rank graph has custom nodes {dict(counts)}, expected {want}")
    leftovers = sorted({n.op_type for n in model.graph.node} & DECOMPOSITION_OPS)
    if leftovers:
        raise ArtifactError(f"rank graph still contains decomposed RMSNorm/RoPE ops {leftovers}")
