"""Pass: structural checks of a rank graph (no rewriting).

"Check" in this project always means structure, never numbers (numbers are *validated* against the
eager model by the comparison engine, `validate/compare.py`):

- `CheckRankGraphPass`: the full rank graph (before partitioning) holds exactly the custom nodes the
  model implies: one RMSNorm per norm (2L + 1), one RoPE per q and k (2L), one Attention per layer (L),
  2L AllReduce and 2 AllGather markers at TP > 1, and none of the ops a decomposed RMSNorm, RoPE or
  attention would leave behind.
- Every written segment then goes through `artifact.schema.check_model` (`onnx.checker`, full check:
  structure, opset/IR versions, the custom ops against their registered schemas, strict shape
  inference).
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.config import ModelConfig
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pass

# Ops that only a decomposed RMSNorm (ReduceMean, Sqrt, Pow, Reciprocal), RoPE (Sin, Cos) or attention
# (Softmax, a Concat-grown or scattered cache) would use.
DECOMPOSITION_OPS = frozenset({"ReduceMean", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos", "Softmax", "ScatterND",
                               "TensorScatter"})


def custom_node_counts(graph: ir.Graph) -> Counter:
    return Counter(n.op_type for n in graph if n.domain == schema.DOMAIN)


def expected_custom_nodes(cfg: ModelConfig, tp: int) -> dict[str, int]:
    want = {schema.RMS_NORM: 2 * cfg.n_layers + 1, schema.ROPE: 2 * cfg.n_layers, schema.ATTENTION: cfg.n_layers}
    if tp > 1:
        want |= {schema.ALL_REDUCE: 2 * cfg.n_layers, schema.ALL_GATHER: 2}
    return want


class CheckRankGraphPass(Pass, ir.passes.InPlacePass):
    """Raise ArtifactError unless the rank graph has exactly the custom nodes `cfg` at `tp` implies."""

    def __init__(self, cfg: ModelConfig, tp: int) -> None:
        self.cfg, self.tp = cfg, tp

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = custom_node_counts(model.graph)
        want = expected_custom_nodes(self.cfg, self.tp)
        got = {k: counts.get(k, 0) for k in want}
        if got != want or set(counts) - set(want):
            raise ArtifactError(f"rank graph has custom nodes {dict(counts)}, expected {want}")
        leftovers = sorted({n.op_type for n in model.graph} & DECOMPOSITION_OPS)
        if leftovers:
            raise ArtifactError(f"rank graph still contains decomposed RMSNorm/RoPE/attention ops {leftovers}")
        return ir.passes.PassResult(model, modified=False)
