"""Pass: grow a graph traced with a few layers to the model's depth by repeating its last layer.

Tracing costs about 0.3 s per layer on 2 cores (torch.export, its decompositions and the ONNX
translation all walk every op), so the exporter traces `TRACED_LAYERS` layers and this pass copies the
last one until the graph has `n_layers` (`exporter.rank_graph`). It runs on the cleaned, not yet named
graph; `NameGraphPass` then names the copies as it names traced layers.

    traced: prelude ─► layer 0 ─► layer 1 ─► layer 2 ─► head
    after:  prelude ─► layer 0 ─► layer 1 ─► layer 2 ─► layer 3 ─► ... ─► layer n-1 ─► head

A layer is the run of nodes from the first to the last node in its module scope (`layers.<i>`). The
last traced layer (the template) is compared node for node with the layer before it, and each value it
reads from outside itself must be one of:
- shared: the value the layer before reads too (graph inputs such as `tokens`, the shape arithmetic
  that common-subexpression elimination left in layer 0);
- carried: made by the layer before, where the layer before reads its own predecessor's counterpart
  (the residual stream);
- its own: `past_key_<i>` / `past_value_<i>` inputs and `layers.<i>.` weights (placeholders).
Copy k reads shared values as they are, carried values from copy k-1 and its own inputs and weights
under index k; its `present_*` outputs join the graph outputs in `schema.graph_outputs` order, its
weights follow the template's in the initializer table (so they are written in model order), and the
head reads the last copy instead of the template. Anything else raises `NotRepeatable` (the exporter
then traces every layer). Copies keep the template's node metadata with the layer index replaced, but
not `pkg.torch.onnx.fx_node` (it names nodes of the traced program); the graph-level
`pkg.torch.export.*` metadata, which describes the traced program, is dropped.
"""

from __future__ import annotations

import itertools
import re

import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.export.passes import Pass
from llama_export.export.passes.naming import module_path
from llama_export.export.passes.placeholders import WEIGHTS_PLACEHOLDER, is_placeholder

TRACED_LAYERS = 3  # layer 0 (holds the shared shape arithmetic), a predecessor and the template
_DROPPED_NODE_METADATA = ("pkg.torch.onnx.fx_node",)
_PROGRAM_METADATA = "pkg.torch.export."


class NotRepeatable(ValueError):
    """The traced layers do not have the structure `RepeatLayersPass` can repeat."""


def _layer_of(node: ir.Node) -> int | None:
    m = re.match(r"layers\.(\d+)(?:\.|$)", module_path(node))
    return int(m.group(1)) if m else None


def reindex(text: str, src: int, dst: int) -> str:
    """`text` with layer index `src` replaced by `dst` where it follows `layers.` or `layers_`
    (weight names, module scopes, the exporter's parameter names)."""
    return re.sub(rf"(?<=layers[._]){src}(?=[._'/:\]]|$)", str(dst), text)


_CACHE_IO = (schema.past_key, schema.past_value, schema.present_key, schema.present_value)


def _own_io(name: str, layer: int):
    """The `schema` function that names `name` for `layer` (a layer's own cache input or output), or None."""
    return next((f for f in _CACHE_IO if f(layer) == name), None)


def _mentions(name: str, layer: int) -> bool:
    return reindex(name, layer, layer + 1) != name


def _same_attrs(a: ir.Node, b: ir.Node) -> bool:
    if set(a.attributes) != set(b.attributes):
        return False
    for name, x in a.attributes.items():
        y = b.attributes[name]
        if x.type != y.type:
            return False
        if x.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return False
        if x.type == ir.AttributeType.TENSOR:
            if x.value.dtype != y.value.dtype or x.value.tobytes() != y.value.tobytes() \
                    or tuple(x.value.shape) != tuple(y.value.shape):
                return False
        elif x.value != y.value:
            return False
    return True


def _shape(v: ir.Value) -> ir.Shape | None:
    return v.shape.copy() if v.shape is not None else None


def _metadata(props, src: int, dst: int) -> dict[str, str]:
    return {k: reindex(v, src, dst) for k, v in props.items() if k not in _DROPPED_NODE_METADATA}


def _copy_node(node: ir.Node, inputs: list[ir.Value | None], src: int, dst: int) -> ir.Node:
    """`node` of layer `src` as a node of layer `dst` reading `inputs`; its outputs are named
    `present_*_<dst>` where the original's are `present_*_<src>`, otherwise provisionally (NameGraphPass
    names them)."""
    copy = ir.Node(node.domain, node.op_type, inputs,
                   attributes=[ir.Attr(a.name, a.type, a.value, doc_string=a.doc_string)
                               for a in node.attributes.values()],
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   doc_string=node.doc_string, metadata_props=_metadata(node.metadata_props, src, dst))
    for old, new in zip(node.outputs, copy.outputs):
        own = _own_io(old.name, src)
        new.name = own(dst) if own else f"{old.name}__layer{dst}"
        new.type, new.shape = old.type, _shape(old)
        new.metadata_props.update(_metadata(old.metadata_props, src, dst))
    return copy


class RepeatLayersPass(Pass, ir.passes.InPlacePass):
    """Repeat the last traced layer until the graph has `n_layers` (see the module docstring)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        names = {v.name for v in g.inputs}
        traced = next(i for i in itertools.count() if schema.past_key(i) not in names)
        if self.n_layers <= traced:
            return ir.passes.PassResult(model, modified=False)
        if traced < TRACED_LAYERS:
            raise NotRepeatable(f"{traced} traced layers; repeating needs {TRACED_LAYERS}")
        nodes = list(g)
        prev, template = (self._span(nodes, i) for i in (traced - 2, traced - 1))
        if prev[1] + 1 != template[0]:
            raise NotRepeatable("nodes outside any layer sit between the last two traced layers")
        p_nodes, t_nodes = nodes[prev[0]:prev[1] + 1], nodes[template[0]:template[1] + 1]
        kinds, corr = self._classify(p_nodes, t_nodes, traced - 1)
        t_set = set(t_nodes)
        # Consumers after the template (the head) read the last copy's values instead.
        later = [(user, i, v) for node in t_nodes for v in node.outputs for user, i in v.uses()
                 if user not in t_set]
        copies, inputs, outputs, weights = [], {}, {}, []
        last: dict[ir.Value, ir.Value] = {v: v for node in t_nodes for v in node.outputs}
        src = traced - 1
        for k in range(traced, self.n_layers):
            vmap: dict[ir.Value, ir.Value] = {}

            def read(v: ir.Value | None) -> ir.Value | None:
                kind = kinds.get(v)
                if v is None or kind == "shared":
                    return v
                if kind == "internal":
                    return vmap[v]
                if kind == "carried":
                    return last[corr[v]]
                if kind == "input":
                    name = _own_io(v.name, src)(k)
                    return inputs.setdefault(name, ir.Value(name=name, shape=_shape(v), type=v.type))
                return self._weight(g, v, src, k, weights)

            for node in t_nodes:
                copy = _copy_node(node, [read(v) for v in node.inputs], src, k)
                vmap.update(zip(node.outputs, copy.outputs))
                outputs.update((v.name, v) for v in copy.outputs if _own_io(v.name, k))
                copies.append(copy)
            last = vmap
        g.insert_after(t_nodes[-1], copies)
        for node, i, v in later:
            node.replace_input_with(i, last[v])
        self._extend_io(g, inputs, outputs)
        self._extend_initializers(g, weights, traced - 1)
        for key in [k for k in g.metadata_props if k.startswith(_PROGRAM_METADATA)]:
            del g.metadata_props[key]
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        want_in, want_out = schema.graph_inputs(self.n_layers), schema.graph_outputs(self.n_layers)
        if tuple(v.name for v in model.graph.inputs) != want_in \
                or tuple(v.name for v in model.graph.outputs) != want_out:
            raise ValueError("repeating the layers did not produce the rank graph's inputs and outputs")

    @staticmethod
    def _span(nodes: list[ir.Node], layer: int) -> tuple[int, int]:
        """(first, last) position of layer `layer`'s nodes; only scope-less nodes may sit in between."""
        at = [i for i, n in enumerate(nodes) if _layer_of(n) == layer]
        if not at:
            raise NotRepeatable(f"no node of layer {layer}")
        inside = {_layer_of(n) for n in nodes[at[0]:at[-1] + 1]} - {layer, None}
        if inside:
            raise NotRepeatable(f"layer {layer}'s nodes are interleaved with layers {sorted(inside)}")
        return at[0], at[-1]

    @staticmethod
    def _classify(p_nodes: list[ir.Node], t_nodes: list[ir.Node], t_layer: int):
        """How the template reads each value (see the module docstring), and the predecessor's node
        outputs -> the template's counterparts; raises NotRepeatable where the two layers differ."""
        if len(p_nodes) != len(t_nodes):
            raise NotRepeatable(f"the last two traced layers have {len(p_nodes)} and {len(t_nodes)} nodes")
        p_set, t_set = set(p_nodes), set(t_nodes)
        corr: dict[ir.Value, ir.Value] = {}
        kinds: dict[ir.Value, str] = {}
        for p, t in zip(p_nodes, t_nodes):
            if (p.domain, p.op_type, p.overload, len(p.inputs), len(p.outputs)) != \
                    (t.domain, t.op_type, t.overload, len(t.inputs), len(t.outputs)) or not _same_attrs(p, t):
                raise NotRepeatable(f"{t.op_type} of layer {t_layer} differs from its predecessor's {p.op_type}")
            for pv, tv in zip(p.inputs, t.inputs):
                kind = RepeatLayersPass._kind(pv, tv, p_set, t_set, corr, t_layer)
                if kinds.setdefault(tv, kind) != kind:
                    raise NotRepeatable(f"layer {t_layer} reads {tv.name} in two ways")
            for pv, tv in zip(p.outputs, t.outputs):
                if pv.is_graph_output() != tv.is_graph_output() or (
                        tv.is_graph_output() and _own_io(tv.name, t_layer) is not _own_io(pv.name, t_layer - 1)):
                    raise NotRepeatable(f"layer {t_layer}'s output {tv.name} does not match {pv.name}")
                if any(u not in p_set and u not in t_set for u in pv.consumers()):
                    raise NotRepeatable(f"{pv.name} of layer {t_layer - 1} is read after layer {t_layer}")
                corr[pv] = tv
        kinds.pop(None, None)
        return kinds, corr

    @staticmethod
    def _kind(pv: ir.Value | None, tv: ir.Value | None, p_set, t_set, corr, t_layer: int) -> str:
        if pv is None and tv is None:
            return "shared"
        if pv is None or tv is None:
            raise NotRepeatable(f"an optional input of layer {t_layer} differs from its predecessor's")
        p_made, t_made = pv.producer(), tv.producer()
        if t_made in t_set:
            if corr.get(pv) is not tv:
                raise NotRepeatable(f"{tv.name} is not wired in layer {t_layer} as in its predecessor")
            return "internal"
        if tv is pv and p_made not in p_set:
            return "shared"
        if t_made in p_set and p_made is not None and p_made not in p_set \
                and (p_made.op_type, pv.index()) == (t_made.op_type, tv.index()):
            return "carried"
        if tv.is_graph_input() and _own_io(tv.name, t_layer) is not None \
                and _own_io(tv.name, t_layer) is _own_io(pv.name, t_layer - 1):
            return "input"
        if is_placeholder(tv) and _mentions(tv.name, t_layer) and reindex(pv.name, t_layer - 1, t_layer) == tv.name:
            return "weight"
        raise NotRepeatable(f"layer {t_layer} reads {tv.name} where its predecessor reads {pv.name}")

    @staticmethod
    def _weight(g: ir.Graph, v: ir.Value, src: int, dst: int, weights: list[ir.Value]) -> ir.Value:
        name = reindex(v.name, src, dst)
        if name not in g.initializers:
            cv = v.const_value
            new = ir.Value(name=name, shape=_shape(v), type=v.type,
                           const_value=ir.ExternalTensor(WEIGHTS_PLACEHOLDER, offset=0, length=cv.nbytes,
                                                         dtype=cv.dtype, shape=cv.shape, name=name))
            new.metadata_props.update(_metadata(v.metadata_props, src, dst))
            g.register_initializer(new)
            weights.append(new)
        return g.initializers[name]

    def _extend_io(self, g: ir.Graph, inputs: dict[str, ir.Value], outputs: dict[str, ir.Value]) -> None:
        have_in = {v.name: v for v in g.inputs} | inputs
        have_out = {v.name: v for v in g.outputs} | outputs
        missing = [n for n in schema.graph_inputs(self.n_layers) if n not in have_in] + \
            [n for n in schema.graph_outputs(self.n_layers) if n not in have_out]
        if missing:
            raise NotRepeatable(f"the repeated layers lack {missing[:3]}")
        g.inputs.clear()
        g.inputs.extend(have_in[n] for n in schema.graph_inputs(self.n_layers))
        g.outputs.clear()
        g.outputs.extend(have_out[n] for n in schema.graph_outputs(self.n_layers))

    @staticmethod
    def _extend_initializers(g: ir.Graph, weights: list[ir.Value], t_layer: int) -> None:
        """Put the copies' weights right after the template's, in the table's (= the writing) order."""
        order = [v for v in g.initializers.values() if v not in set(weights)]
        own = [i for i, v in enumerate(order) if _mentions(v.name, t_layer)]
        at = own[-1] + 1 if own else len(order)
        order = order[:at] + weights + order[at:]
        g.initializers.clear()
        for v in order:
            g.initializers[v.name] = v
