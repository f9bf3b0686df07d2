"""Lower a segment for TensorRT: RMSNorm becomes a plugin node that TensorRT's ONNX parser binds; RoPE and
Attention become the standard ONNX of TensorRT's own layers.

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
    functions: [llama_export.RMSNorm, ...]         functions: []            (others kept)

    q, k, v, past_*, start, lengths ─► llama_export::Attention ─► y, present_*
        ──►  TensorScatter(past_*, k/v, start) + Attention(opset 24)    (export/reference.py)
    x, cos, sin, start ─► llama_export::RoPE ─► y
        ──►  RotaryEmbedding(x, cos, sin, position_ids = start + Range(S))   (opset 23)

Attention and RoPE become standard ONNX, which TensorRT's parser maps to its own layers (KVCacheUpdate
for TensorScatter, writing the cache in place, the attention layer, and the rotary-embedding layer with
position ids; TensorRT >= 10.15 per its documentation). The RoPE plugin (`plugins.py`) implements the
contract-v1 RoPE (tables of the step's rows, the same for every batch row) and cannot express per-row
positions, so v2 graphs do not use it. None of this was built or run here: TensorRT is not installable
in this project's environment.

Other op types, domains, inputs, outputs, names and every other node are untouched. Collective markers
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
from llama_export.export import reference
from llama_export.export.passes import Pass
from llama_export.export.passes.rewrite import replace, require_opsets

PLUGIN_OPS = (schema.RMS_NORM,)
# custom nodes TensorRT runs as its own layers, through their standard-ONNX form
_STANDARD = {schema.ROPE: reference.rope_as_rotary_embedding, schema.ATTENTION: reference.attention}

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = schema.DOMAIN
PLUGIN_VERSION = "1"  # the version `plugins.py` registers its plugins under (not the schema's version)
PLUGIN_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def _all_nodes(graph: ir.Graph):
    return ir.traversal.RecursiveGraphIterator(graph)


class TensorRTLoweringPass(Pass, ir.passes.InPlacePass):
    """RoPE / Attention → standard ONNX; every RMSNorm node marked as a TensorRT plugin; shadowing
    functions dropped."""

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
            if node.op_type not in PLUGIN_OPS and node.op_type not in _STANDARD:
                raise ArtifactError(
                    f"node {node.name!r} has unknown op {schema.DOMAIN}::{node.op_type}; "
                    f"this TensorRT backend knows {(*PLUGIN_OPS, *_STANDARD)}"
                )
        standard = [n for n in model.graph if n.domain == schema.DOMAIN and n.op_type in _STANDARD]
        for node in standard:
            replace(model.graph, node, _STANDARD[node.op_type])
        if standard:
            require_opsets(model, {"": reference.ATTENTION_OPSET})
        for node in _all_nodes(model.graph):
            if node.domain != schema.DOMAIN:
                continue
            for k, v in PLUGIN_ATTRIBUTES.items():
                node.attributes[k] = ir.AttrString(k, v)
            n_lowered += 1
        shadowing = [key for key, f in model.functions.items()
                     if f.domain == schema.DOMAIN and f.name in PLUGIN_OPS]
        for key in shadowing:
            del model.functions[key]
        if shadowing:
            log.debug("removed %d function(s) that would shadow plugins", len(shadowing))
        if n_lowered:
            model.graph.opset_imports.setdefault(schema.DOMAIN, schema.VERSION)
        log.debug("marked %d custom node(s) as TensorRT plugins", n_lowered)
        return ir.passes.PassResult(model, modified=bool(n_lowered or shadowing or standard))

    def ensures(self, model: ir.Model) -> None:
        for node in _all_nodes(model.graph):
            if node.domain == schema.DOMAIN:
                attrs = {k: node.attributes[k].value for k in PLUGIN_ATTRIBUTES if k in node.attributes}
                missing = {k: v for k, v in PLUGIN_ATTRIBUTES.items() if attrs.get(k) != v}
                if missing:
                    raise ArtifactError(f"node {node.name!r} lacks plugin attributes {missing}")
        shadowing = [f.name for f in model.functions.values()
                     if f.domain == schema.DOMAIN and f.name in PLUGIN_OPS]
        if shadowing:
            raise ArtifactError(f"functions {shadowing} would be inlined instead of the TensorRT plugins")


def lower_file(src: Path, dst: Path) -> None:
    """Lower the ONNX file `src` (external data resolved next to it), write it to `dst` and check it.

    The weights are copied beside `dst` in the export's layout (`schema.save_with_data`), so `dst` loads
    wherever it is written.
    """
    model = ir.load(str(src))
    TensorRTLoweringPass()(model)
    schema.save_with_data(model, dst)
    schema.check_model(dst, what=f"lowered graph {dst.name}")
