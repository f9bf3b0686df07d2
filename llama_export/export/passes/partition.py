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

import onnx_ir as ir

from llama_export.artifact import schema


@dataclass(frozen=True)
class Cut:
    """One segment: its model, boundary names, and the collective that follows it."""

    model: ir.Model
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    collective: dict | None  # {"op", "input", "output", "axis"}


def _is_marker(node: ir.Node) -> bool:
    return node.domain == schema.DOMAIN and node.op_type in schema.COLLECTIVE_OPS


def partition(model: ir.Model) -> list[Cut]:
    """Segments in execution order (one segment, no collective, when the graph has no markers).

    Each segment is a new model (`onnx_ir.convenience.extract`) sharing the rank graph's tensors."""
    g = model.graph
    graph_inputs = list(g.inputs)
    level: dict[ir.Value, int] = {v: 0 for v in graph_inputs}
    markers: list[ir.Node] = []
    for node in g:  # exporter output is topologically sorted
        lv = max((level.get(x, 0) for x in node.inputs if x is not None), default=0)
        if _is_marker(node):
            if lv != len(markers):
                raise ValueError(f"collective {node.name} is not on the single chain of collectives")
            markers.append(node)
            lv += 1
        for o in node.outputs:
            level[o] = lv
    consumers_level: dict[ir.Value, int] = {}
    for node in g:
        lv = level[node.outputs[0]] - (1 if _is_marker(node) else 0)
        for x in node.inputs:
            if x is not None:
                consumers_level[x] = max(consumers_level.get(x, -1), lv)

    init_order = {name: i for i, name in enumerate(g.initializers)}
    cuts = []
    for k in range(len(markers) + 1):
        outs: list[ir.Value] = []
        if k < len(markers):
            outs.append(markers[k].inputs[0])
        outs += [o for o in g.outputs if level.get(o) == k and o not in outs]
        # Values made at level k (k >= 1) that later segments read.
        for value, lv in level.items():
            if k >= 1 and lv == k and consumers_level.get(value, -1) > k and value not in outs \
                    and not _is_marker_output(value):
                outs.append(value)
        ins = _boundary_inputs(outs, k, level, graph_inputs)
        sub = ir.convenience.extract(g, ins, outs)
        sub.name = f"{g.name or 'rank'}_seg{k}"
        # extract() collects initializers in a set; keep the rank graph's order (stable files).
        inits = sorted(sub.initializers.values(), key=lambda v: init_order[v.name])
        sub.initializers.clear()
        for v in inits:
            sub.initializers[v.name] = v
        seg = ir.Model(sub, ir_version=model.ir_version, producer_name=model.producer_name,
                       producer_version=model.producer_version)
        coll = None
        if k < len(markers):
            m = markers[k]
            coll = {"op": m.op_type, "input": m.inputs[0].name, "output": m.outputs[0].name,
                    "axis": m.attributes["axis"].as_int() if m.op_type == schema.ALL_GATHER else None}
        cuts.append(Cut(seg, tuple(v.name for v in ins), tuple(v.name for v in outs), coll))
    return cuts


def _is_marker_output(value: ir.Value) -> bool:
    p = value.producer()
    return p is not None and _is_marker(p)


def _boundary_inputs(outs, k, level, graph_inputs) -> list[ir.Value]:
    """Walk back from `outs`; stop at graph inputs, marker outputs and values of earlier segments."""
    seen, ins, stack = set(), [], list(outs)
    graph_in = set(graph_inputs)
    while stack:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        if value in graph_in:
            ins.append(value)
            continue
        node = value.producer()
        if node is None:  # initializer
            continue
        lv = level[value]
        if _is_marker(node) or (1 <= lv < k):
            ins.append(value)
            continue
        if lv > k:
            raise AssertionError(f"segment {k} would need {value.name} of level {lv}")
        stack.extend(node.inputs)
    order = {v: i for i, v in enumerate(graph_inputs)}
    return sorted(ins, key=lambda v: (v not in order, order.get(v, 0), v.name))
