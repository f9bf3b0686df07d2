"""Lower a segment for TensorRT: custom nodes become plugin nodes that TensorRT's ONNX parser binds.

TensorRT's ONNX parser falls back to the plugin registry for an op it does not know, looking the plugin
up by the node's op type, with the node's string attributes `plugin_version` and `plugin_namespace`
(onnx-tensorrt `docs/operators.md` / TensorRT developer guide, "Plugins: Using Custom Layers When
Importing a Model with a Parser"; the node's domain is also used as namespace since TensorRT 10.10). If
the model carries an ONNX *function* of the same name, the parser inlines that function instead of
using the plugin, so the pass removes any such function.

    before                                         after
    ──────                                         ─────
    x ─► llama_export::RMSNorm(epsilon) ─► h       x ─► llama_export::RMSNorm(epsilon,
                                                           plugin_namespace="llama_export",
                                                           plugin_version="1") ─► h
    q ─► llama_export::RoPE(interleaved) ─► q'     q ─► llama_export::RoPE(interleaved,
                                                           plugin_namespace="llama_export",
                                                           plugin_version="1") ─► q'
    functions: [llama_export.RMSNorm, ...]         functions: []            (others kept)

Op types, domains, inputs, outputs, names and every other node are untouched. Collective markers
(`AllReduce`, `AllGather`) are an error: a segment handed to a backend was already cut at them.

Checking: `artifact.schema.check_model` (onnx.checker, full check) accepts the result: the
`llama_export` schemas admit the two plugin attributes, so the lowered custom nodes are checked against
their schema like the canonical ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pass

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = schema.DOMAIN
PLUGIN_VERSION = str(schema.VERSION)
PLUGIN_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def _all_nodes(graph: ir.Graph):
    return ir.traversal.RecursiveGraphIterator(graph)


class TensorRTLoweringPass(Pass, ir.passes.InPlacePass):
    """Mark every llama_export RMSNorm/RoPE node as a TensorRT plugin; drop shadowing functions."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        n_lowered = 0
        for node in _all_nodes(model.graph):
            if node.domain != schema.DOMAIN:
                continue
            if node.op_type in schema.COLLECTIVE_OPS:
                raise ArtifactError(
                    f"node {node.name!r} is a {node.op_type} marker: a segment must not contain collectives "
                    "(the partition pass cuts there); re-export the model"
                )
            if node.op_type not in schema.COMPUTE_OPS:
                raise ArtifactError(
                    f"node {node.name!r} has unknown op {schema.DOMAIN}::{node.op_type}; "
                    f"this TensorRT backend knows {schema.COMPUTE_OPS}"
                )
            for k, v in PLUGIN_ATTRIBUTES.items():
                node.attributes[k] = ir.AttrString(k, v)
            n_lowered += 1
        shadowing = [key for key, f in model.functions.items()
                     if f.domain == schema.DOMAIN and f.name in schema.COMPUTE_OPS]
        for key in shadowing:
            del model.functions[key]
        if shadowing:
            log.debug("removed %d function(s) that would shadow plugins", len(shadowing))
        if n_lowered:
            model.graph.opset_imports.setdefault(schema.DOMAIN, schema.VERSION)
        log.debug("marked %d custom node(s) as TensorRT plugins", n_lowered)
        return ir.passes.PassResult(model, modified=bool(n_lowered or shadowing))

    def ensures(self, model: ir.Model) -> None:
        for node in _all_nodes(model.graph):
            if node.domain == schema.DOMAIN:
                attrs = {k: node.attributes[k].value for k in PLUGIN_ATTRIBUTES if k in node.attributes}
                missing = {k: v for k, v in PLUGIN_ATTRIBUTES.items() if attrs.get(k) != v}
                if missing:
                    raise ArtifactError(f"node {node.name!r} lacks plugin attributes {missing}")
        shadowing = [f.name for f in model.functions.values()
                     if f.domain == schema.DOMAIN and f.name in schema.COMPUTE_OPS]
        if shadowing:
            raise ArtifactError(f"functions {shadowing} would be inlined instead of the TensorRT plugins")


def lower_file(src: Path, dst: Path) -> None:
    """Lower the ONNX file `src` (external data resolved next to it), write it to `dst` and check it.

    Weights go inline below the protobuf limit (`schema.EXTERNAL_DATA_THRESHOLD`), otherwise to
    `dst.name + ".data"` beside `dst`.
    """
    model = ir.load(str(src))
    TensorRTLoweringPass()(model)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = dst.name + ".data" if size >= schema.EXTERNAL_DATA_THRESHOLD else None
    ir.save(model, str(dst), external_data=external)
    schema.check_model(dst, what=f"lowered graph {dst.name}")
