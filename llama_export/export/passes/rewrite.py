"""Shared machinery of the passes that replace each custom node by a small standard-ONNX subgraph.

A *builder* gets the custom node and an `Emit` that records new nodes (an `onnx_ir.tape.Tape`), and
returns the value that replaces the node's output. The pass inserts the recorded nodes in place of the
custom node; the replacement value takes the old output's name, type and shape, so nothing downstream
notices.
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


# builder(node, emit) -> the value that replaces node.outputs[0]
Builder = Callable[[ir.Node, Emit], ir.Value]


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class ReplaceCustomNodesPass(Pass, ir.passes.InPlacePass):
    """Replace every `llama_export` node whose op type has a builder (subclasses set `builders`)."""

    builders: Mapping[str, Builder] = {}
    extra_opsets: Mapping[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        changed = False
        for node in list(g):
            build = self.builders.get(node.op_type) if node.domain == schema.DOMAIN else None
            if build is None:
                continue
            emit = Emit(node)
            out = build(node, emit)
            ir.convenience.replace_nodes_and_values(g, node, [node], emit.tape.nodes, [node.outputs[0]], [out])
            changed = True
        if not any(n.domain == schema.DOMAIN for n in g):
            g.opset_imports.pop(schema.DOMAIN, None)
        for domain, version in self.extra_opsets.items():
            g.opset_imports.setdefault(domain, version)
        return ir.passes.PassResult(model, modified=changed)

    def ensures(self, model: ir.Model) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == schema.DOMAIN and n.op_type in self.builders})
        if left:
            raise AssertionError(f"{self} left custom nodes {left}")
