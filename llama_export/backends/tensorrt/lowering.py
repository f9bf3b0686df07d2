"""Lower a segment for TensorRT: RMSNorm and RoPE become plugin nodes that TensorRT's ONNX parser binds to
our `tensorrt.plugin` plugins (`plugins.py`); Attention becomes the standard ONNX that the parser maps to
TensorRT's own KV-cache-update and attention layers.

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
    x, cos, sin, start ─► llama_export::RoPE       x, cos, sin, start ─► llama_export::RoPE(interleaved,
        (interleaved) ─► y                                 plugin_namespace, plugin_version) ─► y
    functions: [llama_export.RMSNorm, ...]         functions: []            (others kept)

    q, k, v, past_*, start, lengths ─► llama_export::Attention ─► y, present_*
        ──►  TensorScatter(past_*, k/v, start, axis=-2) + Attention(opset 24, no softmax_precision)
             (`export/reference.py`, `attention(fp32_softmax=False)`)

What the parser accepts was read in onnx-tensorrt's source (`onnxOpImporters.cpp`, `onnxOpCheckers.cpp`,
`docs/operators.md` of 10.15, the release that added TensorScatter and the newest source found; TensorRT
11's parser source was not available, so these rules are assumed unchanged in 11.4):
- TensorScatter: 4-D cache and update, `axis` -2 (operators.md: "`axis` must be -2"; the lowering writes
  -2, not the equivalent 2, whatever the importer normalises), mode
  linear, `write_indices` cast to INT32 by the parser; it becomes IKVCacheUpdateLayer, whose cache must
  be a network input with a static sequence length (profiles pin `capacity`) and whose output must be a
  network output sharing the cache's memory (`present_*`; the runner binds it to `past_*`).
- Attention: one output, 4-D Q/K/V and mask, no past_key/past_value inputs; its static checker rejects
  `softcap` and any `softmax_precision` ("Setting softmax precision is not supported in TensorRT
  Attention"), which is why this lowering leaves that attribute out (the reference decomposition sets it
  to fp32). The boolean mask [B, 1, S, C] and GQA (KV heads dividing query heads) are what TensorRT's
  IAttention documents. The softmax precision is then TensorRT's choice.
- Attention becomes one IAttention, which the builder must run as a single fused kernel unless it is
  marked decomposable; where TensorRT has no fused kernel (likely fp32, or a head_dim such as 48) the
  build fails. The importer reads `TRT_decomposable` (int, default 0) into `IAttention::setDecomposable`
  (onnx-tensorrt's Attention importer; the attribute NVIDIA's TensorRT-Edge-LLM and Model Optimizer write
  on standard Attention nodes for TensorRT >= 10.15; `IAttention.decomposable` in the 11.4 bindings:
  "whether decomposition into primitive ops is allowed when no attention fusion is supported"), so
  `lower_file` writes `TRT_decomposable=1` on each Attention: the fused kernel where TensorRT has one,
  primitive layers otherwise; a build never fails for want of a kernel.
- Plugin nodes: `start` stays int64 (TensorRT plugin I/O takes INT64; only BOOL and UINT8 are refused).
None of this was parsed or built here: TensorRT's libraries cannot be installed in this environment.

Other op types, domains, inputs, outputs, names and every other node are untouched. Collective markers
(`AllReduce`, `AllGather`) are an error: a segment handed to a backend was already cut at them.

Checking: `artifact.schema.check_model` (onnx.checker, full check) accepts the result: the
`llama_export` schemas admit the two plugin attributes, so the lowered custom nodes are checked against
their schema like the canonical ones. `tests/tensorrt/test_lowering.py` runs lowered exports on ONNX
Runtime (plugin nodes replaced by their reference decompositions) against the eager model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.errors import ArtifactError
from llama_export.export import reference
from llama_export.export.passes import Pass
from llama_export.export.passes.rewrite import Emit, replace, require_opsets

PLUGIN_OPS = (schema.RMS_NORM, schema.ROPE)
DECOMPOSABLE = "TRT_decomposable"  # onnx-tensorrt's Attention attribute: IAttention::setDecomposable


def _attention(node: ir.Node, op: Emit) -> tuple[ir.Value, ir.Value, ir.Value]:
    return reference.attention(node, op, fp32_softmax=False)


# custom nodes TensorRT runs as its own layers, through their standard-ONNX form
_STANDARD = {schema.ATTENTION: _attention}

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = schema.DOMAIN
PLUGIN_VERSION = "1"  # the version `plugins.py` registers its plugins under (not the schema's version)
PLUGIN_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def _all_nodes(graph: ir.Graph):
    return ir.traversal.RecursiveGraphIterator(graph)


class TensorRTLoweringPass(Pass, ir.passes.InPlacePass):
    """Attention → standard ONNX; every RMSNorm / RoPE node marked as a TensorRT plugin; shadowing
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


def mark_decomposable(path: Path) -> int:
    """Set `TRT_decomposable=1` on every standard Attention node of the ONNX file `path` (the graph only;
    its external data stays as written); returns how many. See the module docstring: without it,
    TensorRT builds each Attention as one fused kernel or fails."""
    proto = onnx.load(str(path), load_external_data=False)
    marked = 0
    for node in proto.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            kept = [a for a in node.attribute if a.name != DECOMPOSABLE]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute(DECOMPOSABLE, 1)])
            marked += 1
    onnx.save(proto, str(path))
    return marked


def lower_file(src: Path, dst: Path) -> None:
    """Lower the ONNX file `src` (external data resolved next to it), write it to `dst`, check it, then
    mark its Attention nodes decomposable for TensorRT.

    The weights are copied beside `dst` in the export's layout (`schema.save_with_data`), so `dst` loads
    wherever it is written. The check (onnx.checker, full) runs before the marking: `TRT_decomposable`
    is TensorRT's attribute, which the ONNX schema of Attention (and so the checker and ONNX Runtime)
    does not admit.
    """
    model = ir.load(str(src))
    TensorRTLoweringPass()(model)
    schema.save_with_data(model, dst)
    schema.check_model(dst, what=f"lowered graph {dst.name}")
    marked = mark_decomposable(dst)
    log.debug("%s: %d Attention node(s) marked %s=1", dst.name, marked, DECOMPOSABLE)
