"""Shared machinery of the passes that replace each custom node by a small standard-ONNX subgraph.

A *builder* gets the custom node and an `Emit` that records new nodes (an `onnx_ir.tape.Tape`), and
returns the value (or tuple of values, one per output) that replaces the node's outputs. The pass
inserts the recorded nodes in place of the custom node; the replacement values take the old outputs'
names, types and shapes, so nothing downstream notices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.export.passes import Pass


class Emit:
    """Records the replacement nodes of one custom node; names them under that node's name."""

    def __init__(self, node: ir.Node) -> None:
        self.tape = ir.tape.Tape()
        self.prefix = node.name or node.op_type

    def __call__(self, op_type: str, inputs: Sequence[ir.Value | None], domain: str = "", **attributes) -> ir.Value:
        return self.tape.op(op_type, inputs, attributes or None, domain=domain,
                            name=f"{self.prefix}/{op_type}_{len(self.tape.nodes)}")

    def multi(self, op_type: str, inputs: Sequence[ir.Value | None], n: int, **attributes) -> Sequence[ir.Value]:
        return self.tape.op_multi_out(op_type, inputs, attributes or None, num_outputs=n,
                                      name=f"{self.prefix}/{op_type}_{len(self.tape.nodes)}")

    def i64(self, values: Sequence[int]) -> ir.Value:
        """A Constant node holding int64 `values` (1-D)."""
        return self("Constant", [], value=ir.tensor(np.asarray(values, dtype=np.int64)))

    def cast(self, x: ir.Value, to: ir.DataType) -> ir.Value:
        """Cast, or the value itself when it already has that type."""
        return x if x.dtype == to else self("Cast", [x], to=int(to))

    def scalar(self, value: int) -> ir.Value:
        """A Constant node holding an int64 scalar."""
        return self("Constant", [], value=ir.tensor(np.int64(value)))

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """Scalar int64: the size of `x` along `axis` (non-negative)."""
        return self("Squeeze", [self("Shape", [x], start=axis, end=axis + 1), self.i64([0])])

    def positions(self, x: ir.Value, start: ir.Value) -> ir.Value:
        """Absolute positions `[B, S]` = start[b] + i, for `x` of shape `[B, S, ...]` (the contract's)."""
        steps = self("Range", [self.scalar(0), self.dim(x, 1), self.scalar(1)])
        return self("Add", [self("Unsqueeze", [start, self.i64([1])]), self("Unsqueeze", [steps, self.i64([0])])])


# builder(node, emit) -> the value(s) that replace node.outputs
Builder = Callable[[ir.Node, Emit], "ir.Value | tuple[ir.Value, ...]"]


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class ReplaceCustomNodesPass(Pass, ir.passes.InPlacePass):
    """Replace every `llama_export` node whose op type has a builder (subclasses set `builders`)."""

    builders: Mapping[str, Builder] = {}
    # domain -> the least opset version the emitted nodes need ("": the standard domain)
    extra_opsets: Mapping[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        changed = False
        for node in list(g):
            build = self.builders.get(node.op_type) if node.domain == schema.DOMAIN else None
            if build is None:
                continue
            replace(g, node, build)
            changed = True
        if not any(n.domain == schema.DOMAIN for n in g):
            g.opset_imports.pop(schema.DOMAIN, None)
        if changed:
            require_opsets(model, self.extra_opsets)
        return ir.passes.PassResult(model, modified=changed)

    def ensures(self, model: ir.Model) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == schema.DOMAIN and n.op_type in self.builders})
        if left:
            raise AssertionError(f"{self} left custom nodes {left}")


def replace(graph: ir.Graph, node: ir.Node, build: Builder) -> None:
    """Replace `node` by what `build` emits (its outputs by the returned values, in order)."""
    emit = Emit(node)
    out = build(node, emit)
    outs = out if isinstance(out, tuple) else (out,)
    ir.convenience.replace_nodes_and_values(graph, node, [node], emit.tape.nodes, list(node.outputs)[: len(outs)],
                                            list(outs))


def require_opsets(model: ir.Model, opsets: Mapping[str, int]) -> None:
    """Import each domain at least at the given version (raising the model's own import if lower)."""
    imports = model.graph.opset_imports
    for domain, version in opsets.items():
        imports[domain] = max(imports.get(domain, version), version)
        if domain in model.opset_imports or domain == "":
            model.opset_imports[domain] = imports[domain]
