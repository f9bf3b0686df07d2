"""Pass: cut a rank graph at its collective markers into segments the runner stitches together.

    before (one rank graph)                      after (segments + collectives owned by the runner)
    tokens ─► Gather ─► AllGather ─► RMSNorm …   seg 0: tokens ─► Gather ─► g0_in
              … MatMul(wo) ─► AllReduce ─► Add    (runner: g0_out = all_gather(g0_in))
                                                 seg 1: g0_out, past_key_0 … ─► MatMul(wo) ─► r1_in
                                                 (runner: r1_out = all_reduce(r1_in))
                                                 seg 2: r1_out, g0_out ─► Add …

Every node gets a *level*: the number of markers it depends on (a marker's output is one level above
its input). Segment k computes the values of level k. A value it needs from an earlier segment becomes
one of its inputs; the runner keeps every segment output by name until the end of the step. Values
that depend on no marker at all (the causal mask, RoPE table slices, shapes) are cheap and are
recomputed in every segment that needs them, so that each segment is self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from llama_export.export import schema


@dataclass(frozen=True)
class Cut:
    """One segment: its ONNX model, boundary names, and the collective that follows it."""

    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    collective: dict | None  # {"op", "input", "output", "axis"}


def _is_marker(node: onnx.NodeProto) -> bool:
    return node.domain == schema.DOMAIN and node.op_type in schema.COLLECTIVE_OPS


def partition(model: onnx.ModelProto) -> list[Cut]:
    """Segments in execution order (one segment, no collective, when the graph has no markers)."""
    g = model.graph
    graph_inputs = [v.name for v in g.input]
    graph_outputs = [v.name for v in g.output]
    producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output if o}
    level: dict[str, int] = {name: 0 for name in graph_inputs}
    level.update({i.name: 0 for i in g.initializer})
    markers: list[onnx.NodeProto] = []
    for node in g.node:  # exporter output is topologically sorted
        lv = max((level.get(x, 0) for x in node.input if x), default=0)
        if _is_marker(node):
            if lv != len(markers):
                raise ValueError(f"collective {node.name} is not on the single chain of collectives")
            markers.append(node)
            lv += 1
        for o in node.output:
            level[o] = lv
    consumers_level: dict[str, int] = {}
    for node in g.node:
        lv = level[node.output[0]] - (1 if _is_marker(node) else 0)
        for x in node.input:
            consumers_level[x] = max(consumers_level.get(x, -1), lv)

    types = {v.name: v for v in [*g.input, *g.output, *g.value_info]}
    n_seg = len(markers) + 1
    cuts = []
    for k in range(n_seg):
        outs: list[str] = []
        if k < len(markers):
            outs.append(markers[k].input[0])
        outs += [o for o in graph_outputs if level.get(o) == k and o not in outs]
        # Values made at level k (k >= 1) that later segments read.
        for name, lv in level.items():
            if k >= 1 and lv == k and consumers_level.get(name, -1) > k and name not in outs \
                    and not _is_marker_output(name, producer):
                outs.append(name)
        ins, nodes = _walk_back(outs, k, level, producer, graph_inputs)
        extracted = _extract(model, ins, outs, nodes, types, f"{g.name or 'rank'}_seg{k}")
        coll = None
        if k < len(markers):
            m = markers[k]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in m.attribute}
            coll = {"op": m.op_type, "input": m.input[0], "output": m.output[0],
                    "axis": attrs.get("axis") if m.op_type == schema.ALL_GATHER else None}
        cuts.append(Cut(extracted, tuple(ins), tuple(outs), coll))
    return cuts


def _is_marker_output(name: str, producer: dict[str, onnx.NodeProto]) -> bool:
    p = producer.get(name)
    return p is not None and _is_marker(p)


def _walk_back(outs, k, level, producer, graph_inputs) -> tuple[list[str], set[int]]:
    """Walk back from `outs`; stop at graph inputs, marker outputs and values of earlier segments.

    Returns the segment's inputs and the ids of the nodes it contains."""
    seen, ins, stack, nodes = set(), [], list(outs), set()
    graph_in = set(graph_inputs)
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in graph_in:
            ins.append(name)
            continue
        node = producer.get(name)
        if node is None:  # initializer
            continue
        lv = level[name]
        if _is_marker(node) or (1 <= lv < k):
            ins.append(name)
            continue
        if lv > k:
            raise AssertionError(f"segment {k} would need {name} of level {lv}")
        nodes.add(id(node))
        stack.extend(node.input)
    order = {n: i for i, n in enumerate(graph_inputs)}
    return sorted(ins, key=lambda n: (n not in order, order.get(n, 0), n)), nodes


def _extract(model: onnx.ModelProto, ins: list[str], outs: list[str], node_ids: set[int],
             types: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    """A standalone model of the given nodes (original order), boundary values and used weights."""
    g = model.graph
    nodes = [n for n in g.node if id(n) in node_ids]
    used = {x for n in nodes for x in n.input}
    inits = [i for i in g.initializer if i.name in used]
    inner = {o for n in nodes for o in n.output} | set(ins) | set(outs)
    missing = [x for x in (*ins, *outs) if x not in types]
    if missing:
        raise AssertionError(f"no type information for boundary values {missing}")
    graph = onnx.helper.make_graph(
        nodes, name, [types[x] for x in ins], [types[x] for x in outs], inits,
        value_info=[v for v in g.value_info if v.name in inner and v.name not in ins and v.name not in outs],
    )
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 producer_name=model.producer_name, producer_version=model.producer_version)
    return out
