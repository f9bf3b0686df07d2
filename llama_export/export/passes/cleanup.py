"""Pass: constant folding and cleanup of a freshly traced, weightless graph (onnx_ir model, in place).

    before                                         after
    Shape(x) ─► Gather(1) ─► Add(c) ─► Reshape     Shape(x) ─► Gather(1) ─► Add(c) ─► Reshape
    Constant(2) ─► Mul(Constant(3)) ─► Reshape     Constant(6) ─────────────────────► Reshape
    a ─► Identity ─► MatMul                        a ─► MatMul
    node metadata: torch's stack trace             (dropped: it holds this machine's source paths)
    y = f(a); z = f(a) (same node twice)           y = f(a); z = y
    W (placeholder) ─► Transpose                   W (placeholder) ─► Transpose    (left for `weights`)
    Shape(past_value_4)[0:1]   (batch)             Shape(tokens)[0:1]

The last row is ours: the exporter reads a size that `tokens` also has (batch, seq) from whichever
input its symbolic-shape solver picked, which changes with the number of layers (past_key_1 at 2 to 8
layers, past_value_4 at 12) and made every attention segment at TP > 1 take that layer's cache as an
extra input; reading it from `tokens` makes the graph independent of that choice.

These are onnxscript's optimizer passes (constant folding, unused-node removal) and onnx_ir's common
passes (identity elimination, common-subexpression elimination). `onnxscript.optimizer.optimize` as a
whole cannot run here: its initializer deduplication reads every weight, and the weights are not
attached yet. Folding is kept to small tensors and never touches a node that reads a weight.
"""

from __future__ import annotations

import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.export.passes import Pass
from llama_export.export.passes.placeholders import is_placeholder, reads_placeholder


# torch.onnx records the Python stack of each node's origin, with this machine's file paths: an export
# would carry them (and its bytes would depend on where the package is installed); they are dropped.
_STACK_TRACE = "pkg.torch.onnx.stack_trace"
_INPUT_LIMIT = 16  # elements: only constants this small are folded (shape arithmetic, scalars)
_FOLD_LIMIT = 1 << 16  # elements: largest folded result; weight-sized tensors are never made here


def _data(model: ir.Model, limit: int) -> list[str]:
    """Initializers above `limit` elements that hold data (are not placeholders)."""
    return [name for name, v in model.graph.initializers.items()
            if v.const_value is not None and not is_placeholder(v) and v.const_value.size > limit]


def _sizes_from_tokens(g: ir.Graph) -> None:
    """Point every `Shape` that reads one symbolic dimension of a graph input at the same dimension of
    `tokens`, where `tokens` has it."""
    tokens = next((v for v in g.inputs if v.name == schema.TOKENS), None)
    if tokens is None or tokens.shape is None:
        return
    axes = {d.value: i for i, d in enumerate(tokens.shape) if isinstance(d, ir.SymbolicDim) and d.value}
    for node in g:
        x = node.inputs[0] if node.op_type == "Shape" and node.domain == "" and node.inputs else None
        if x is None or x is tokens or not x.is_graph_input() or x.shape is None:
            continue
        rank = len(x.shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else min(end, rank))
        dim = x.shape[start] if end - start == 1 else None
        if isinstance(dim, ir.SymbolicDim) and dim.value in axes:
            axis = axes[dim.value]
            node.replace_input_with(0, tokens)
            node.attributes["start"] = ir.AttrInt64("start", axis)
            node.attributes["end"] = ir.AttrInt64("end", axis + 1)


class CleanupPass(Pass, ir.passes.InPlacePass):
    """Fold constants and remove dead, duplicate and identity nodes; never reads a weight."""

    def requires(self, model: ir.Model) -> None:
        if _data(model, _INPUT_LIMIT):
            raise ValueError(f"weights {_data(model, _INPUT_LIMIT)[:3]} are attached; clean up the weightless trace")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnx_ir.passes.common as common
        import onnxscript.optimizer

        onnxscript.optimizer.inline(model)
        _sizes_from_tokens(model.graph)
        for _ in range(2):
            onnxscript.optimizer.fold_constants_ir(
                model, input_size_limit=_INPUT_LIMIT, output_size_limit=_FOLD_LIMIT,
                should_fold=lambda node: False if reads_placeholder(node) else None)
            onnxscript.optimizer.remove_unused_nodes(model)
        for p in (common.IdentityEliminationPass(), common.CommonSubexpressionEliminationPass(),
                  common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()):
            p(model)
        for node in model.graph.all_nodes():  # the tracing machine's source paths: not for an export
            node.metadata_props.pop(_STACK_TRACE, None)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if _data(model, _FOLD_LIMIT):
            raise ValueError(f"folding materialised weight-sized tensors {_data(model, _FOLD_LIMIT)[:3]}")
