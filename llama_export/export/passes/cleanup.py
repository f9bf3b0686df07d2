"""Pass: constant folding and cleanup of a freshly traced, weightless graph (onnx_ir model, in place).

    before                                         after
    Shape(x) ─► Gather(1) ─► Add(c) ─► Reshape     Shape(x) ─► Gather(1) ─► Add(c) ─► Reshape
    Constant(2) ─► Mul(Constant(3)) ─► Reshape     Constant(6) ─────────────────────► Reshape
    a ─► Identity ─► MatMul                        a ─► MatMul
    y = f(a); z = f(a) (same node twice)           y = f(a); z = y
    W (placeholder) ─► Transpose                   W (placeholder) ─► Transpose    (left for `weights`)

These are onnxscript's optimizer passes (constant folding, unused-node removal) and onnx_ir's common
passes (identity elimination, common-subexpression elimination). `onnxscript.optimizer.optimize` as a
whole cannot run here: its initializer deduplication reads every weight, and the weights are not
attached yet. Folding is kept to small tensors and never touches a node that reads a weight.
"""

from __future__ import annotations

from llama_export.export.trace import WEIGHTS_PLACEHOLDER


def _reads_placeholder(node) -> bool:
    for v in node.inputs:
        cv = v.const_value if v is not None else None
        if cv is not None and getattr(cv, "location", None) == WEIGHTS_PLACEHOLDER:
            return True
    return False


def cleanup(graph_model) -> None:
    """Fold constants and remove dead, duplicate and identity nodes, in place."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    onnxscript.optimizer.inline(graph_model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants_ir(
            graph_model, input_size_limit=16, output_size_limit=1 << 16,
            should_fold=lambda node: False if _reads_placeholder(node) else None)
        onnxscript.optimizer.remove_unused_nodes(graph_model)
    common.IdentityEliminationPass()(graph_model)
    common.CommonSubexpressionEliminationPass()(graph_model)
    common.RemoveUnusedNodesPass()(graph_model)
    common.RemoveUnusedOpsetsPass()(graph_model)
