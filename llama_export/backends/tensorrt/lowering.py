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

Checking: `onnx.checker.check_model(full_check=True)` accepts the result. The checker verifies the
graph structure and the schemas of ONNX-domain nodes; for the `llama_export` domain it has no schema
(the plugin is registered with TensorRT, not ONNX), so it checks those nodes structurally only and strict
shape inference leaves their outputs untyped; the exported graph's declared output types stand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from llama_export.errors import ArtifactError
from llama_export.export import schema

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = schema.DOMAIN
PLUGIN_VERSION = str(schema.VERSION)
PLUGIN_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}

# onnx.save writes one protobuf of at most 2 GiB; beyond ~1.8 GB use external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def lower_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` with every llama_export RMSNorm/RoPE node marked as a TensorRT plugin."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    n_lowered = 0
    for graph in _all_graphs(out.graph):
        for node in graph.node:
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
            kept = [a for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in PLUGIN_ATTRIBUTES.items())
            n_lowered += 1
    kept_functions = [
        f for f in out.functions if not (f.domain == schema.DOMAIN and f.name in schema.COMPUTE_OPS)
    ]
    if len(kept_functions) != len(out.functions):
        log.debug("removed %d function(s) that would shadow plugins", len(out.functions) - len(kept_functions))
        del out.functions[:]
        out.functions.extend(kept_functions)
    if n_lowered and not any(o.domain == schema.DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(schema.DOMAIN, schema.VERSION))
    log.debug("marked %d custom node(s) as TensorRT plugins", n_lowered)
    return out


def check_lowered(model: onnx.ModelProto) -> None:
    """Run the ONNX checker (full check) and the lowering's own invariants; raise ArtifactError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"lowered graph fails the ONNX checker: {e}") from None
    for graph in _all_graphs(model.graph):
        for node in graph.node:
            if node.domain == schema.DOMAIN:
                attrs = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
                missing = {k: v for k, v in PLUGIN_ATTRIBUTES.items() if attrs.get(k) != v}
                if missing:
                    raise ArtifactError(f"node {node.name!r} lacks plugin attributes {missing}")
    shadowing = [f.name for f in model.functions if f.domain == schema.DOMAIN and f.name in schema.COMPUTE_OPS]
    if shadowing:
        raise ArtifactError(f"functions {shadowing} would be inlined instead of the TensorRT plugins")


def lower_file(src: Path, dst: Path) -> onnx.ModelProto:
    """Lower the ONNX file `src` (external data resolved next to it) and write it to `dst`.

    Weights go inline below ~1.8 GB, otherwise to `dst.name + ".data"` beside `dst`.
    """
    model = onnx.load(str(src), load_external_data=True)
    lowered = lower_for_tensorrt(model)
    # The checker reads external data relative to the model path; check before splitting weights out.
    if lowered.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
        check_lowered(lowered)
        onnx.save(lowered, str(dst))
    else:
        onnx.save(lowered, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
        check_lowered(onnx.load(str(dst), load_external_data=False))
    return lowered
