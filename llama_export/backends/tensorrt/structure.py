"""The "same structure" key of a segment graph, and renaming one graph into another's names.

Layer segments of one kind (every layer's attention part, every layer's FFN part) are the same graph up
to names (`/model/layers.3/...`, `past_key_3`) and weight values. TensorRT needs to build (and tune
tactics for) only one of them with the REFIT flag; every other layer's engine is that engine refit with
its own weights. That saves n_layers - 1 engine builds per kind (each minutes for real models) and the
tactic timing they would repeat; plan files are still written per layer, so the runner stays simple.

    structure_key(model): sha256 of the graph with
      - every name (inputs, outputs, initializers, intermediate values, nodes) replaced by its position
        (graph inputs i0.., initializers w0.., node outputs t0.., nodes n0..), and
      - floating-point initializer *values* dropped (dtype and dims kept): those are the refittable
        weights; integer initializers (shapes, indices) stay in the key because they are structure.

    rename_like(model, reference): model with every name replaced by the reference's name at the same
      position (requires equal keys), so TensorRT's ONNX refitter finds the weights under the names the
      reference engine was built with; `io_name_map` tells the runner which engine tensor is which input.

Only the top-level graph is canonicalised (exported segments have no control-flow subgraphs).
"""

from __future__ import annotations

import hashlib

import onnx

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
}


def canonical_names(model: onnx.ModelProto) -> dict[str, str]:
    """Map every value/initializer name to its positional token (nodes are mapped separately)."""
    names: dict[str, str] = {}
    g = model.graph
    for i, v in enumerate(g.input):
        names.setdefault(v.name, f"i{i}")
    for i, t in enumerate(g.initializer):
        names.setdefault(t.name, f"w{i}")
    k = 0
    for node in g.node:
        for out in node.output:
            if out and out not in names:
                names[out] = f"t{k}"
                k += 1
    return names


def _renamed(model: onnx.ModelProto, value_names: dict[str, str], node_names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def r(name: str) -> str:
        return value_names.get(name, name) if name else name

    for v in [*g.input, *g.output, *g.value_info]:
        v.name = r(v.name)
    for t in g.initializer:
        t.name = r(t.name)
    for node, new_name in zip(g.node, node_names):
        node.name = new_name
        node.input[:] = [r(x) for x in node.input]
        node.output[:] = [r(x) for x in node.output]
    return out


def structure_key(model: onnx.ModelProto) -> str:
    """sha256 hex of the graph with names made positional and float weight values dropped."""
    canon = _renamed(model, canonical_names(model), [f"n{i}" for i in range(len(model.graph.node))])
    g = canon.graph
    g.name = "segment"
    del g.value_info[:]  # shape annotations are derived, not structure
    g.ClearField("doc_string")
    for t in g.initializer:
        if t.data_type in _FLOAT_TYPES:
            dims, dtype, name = list(t.dims), t.data_type, t.name
            t.Clear()
            t.dims[:], t.data_type, t.name = dims, dtype, name
    canon.ClearField("producer_version")
    canon.ClearField("doc_string")
    del canon.metadata_props[:]
    return hashlib.sha256(canon.SerializeToString(deterministic=True)).hexdigest()


def rename_like(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the names of `reference` (same structure key), keeping `model`'s weight values."""
    if structure_key(model) != structure_key(reference):
        raise ValueError(f"graphs {model.graph.name!r} and {reference.graph.name!r} differ in structure")
    to_pos = canonical_names(model)
    from_pos = {pos: name for name, pos in canonical_names(reference).items()}
    value_names = {name: from_pos[pos] for name, pos in to_pos.items()}
    return _renamed(model, value_names, [n.name for n in reference.graph.node])


def io_name_map(model: onnx.ModelProto, reference: onnx.ModelProto) -> dict[str, str]:
    """model's graph input/output names -> the reference's names at the same positions."""
    g, ref = model.graph, reference.graph
    pairs = list(zip(g.input, ref.input)) + list(zip(g.output, ref.output))
    return {a.name: b.name for a, b in pairs}
