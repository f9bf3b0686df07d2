"""Shared machinery of the passes that replace each custom node by a small standard-ONNX subgraph."""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

from llama_export.export import schema

# builder(node, fresh) -> replacement nodes; `fresh(suffix)` makes a unique value name under the node.
Builder = Callable[[onnx.NodeProto, Callable[[str], str]], list[onnx.NodeProto]]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def replace_custom_nodes(model: onnx.ModelProto, builders: dict[str, Builder],
                         *, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of `model` with every `llama_export` node whose op type is in `builders` replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        build = builders.get(node.op_type) if node.domain == schema.DOMAIN else None
        if build is None:
            new_nodes.append(node)
            continue
        counter = [0]

        def fresh(suffix: str, _node=node, _counter=counter) -> str:
            _counter[0] += 1
            return f"{_node.name}/{suffix}_{_counter[0]}"

        for i, n in enumerate(build(node, fresh)):
            if not n.name:
                n.name = f"{node.name}/{n.op_type}_{i}"
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(n.domain == schema.DOMAIN for n in g.node):
        keep = [o for o in out.opset_import if o.domain != schema.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    for domain, version in (extra_opsets or {}).items():
        if not any(o.domain == domain for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(domain, version))
    return out


def const_i64(values: list[int], name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                               [len(values)], values))


def elem_type(model: onnx.ModelProto, name: str) -> int:
    """Element type of value `name` (graph I/O, value_info or initializer)."""
    g = model.graph
    for v in (*g.input, *g.output, *g.value_info):
        if v.name == name:
            return v.type.tensor_type.elem_type
    for i in g.initializer:
        if i.name == name:
            return i.data_type
    raise KeyError(f"no type recorded for {name}")
