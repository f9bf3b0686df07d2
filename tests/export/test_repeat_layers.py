"""Repeating the last traced layer (`passes.repeat`) gives the graph a trace of every layer gives.

The reference is the exporter's own full trace (`rank_graph(..., repeat=False)`): nodes, names, inputs,
outputs, attributes, value types and shapes, initializer order and folded constants must be equal.
Node metadata is compared without the FX node names the tracer puts in it (a copy carries its
template's). The numbers of a repeated export are checked against the eager model on ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import onnx_ir as ir
import pytest

from llama_export.artifact import schema
from llama_export.config import Precision
from llama_export.export.exporter import ExportOptions, export, rank_graph
from llama_export.export.passes import Pipeline
from llama_export.export.passes.cleanup import CleanupPass
from llama_export.export.passes.partition import partition
from llama_export.export.passes.repeat import TRACED_LAYERS, NotRepeatable, RepeatLayersPass
from llama_export.validate.compare import validate_export
from llama_export.tolerances import TOLERANCES
from tests.helpers import random_meta_state, tiny_config, write_meta

_FX_NAME = re.compile(r"\b[a-z_]+_\d+(?=[:'])")  # `linear_12: aten.linear`, `'rope_6'` in scope metadata


def _tensor_text(v: ir.Value) -> str:
    cv = v.const_value
    data = cv.tobytes() if getattr(cv, "location", None) is None else cv.location
    return f"{v.name} {cv.dtype} {tuple(cv.shape)} {data!r}"


def _structure(model: ir.Model) -> list[str]:
    g = model.graph
    lines = [f"in {v.name} {v.type} {v.shape}" for v in g.inputs]
    lines += [f"out {v.name} {v.type} {v.shape}" for v in g.outputs]
    lines += ["init " + _tensor_text(v) for v in g.initializers.values()]
    for n in g:
        attrs = [(a.name, str(a.value)) for a in n.attributes.values()]
        meta = sorted((k, _FX_NAME.sub("FX", v)) for k, v in n.metadata_props.items() if k != "pkg.torch.onnx.fx_node")
        lines.append(f"node {n.domain} {n.op_type} {n.name} {[v.name if v else '' for v in n.inputs]} "
                     f"{[(v.name, str(v.type), str(v.shape)) for v in n.outputs]} {attrs} {meta}")
    return lines


def _cfg(name: str, n_layers: int):
    return dataclasses.replace(tiny_config(name), n_layers=n_layers)


@pytest.mark.parametrize(("name", "tp", "rank", "dtype"), [
    ("gqa", 2, 1, Precision.FP32),
    ("mha", 1, 0, Precision.FP16),
    ("gqa", 4, 3, Precision.FP32),  # 2 kv heads replicated over 4 ranks
])
def test_repeated_graph_equals_the_full_trace(name, tp, rank, dtype):
    cfg = _cfg(name, TRACED_LAYERS + 2)
    full = rank_graph(cfg, tp=tp, dtype=dtype, max_batch=4, rank=rank, repeat=False)
    repeated = rank_graph(cfg, tp=tp, dtype=dtype, max_batch=4, rank=rank)
    assert len(repeated.graph) > len(rank_graph(_cfg(name, TRACED_LAYERS), tp=tp, dtype=dtype, max_batch=4,
                                                rank=rank).graph)
    assert _structure(repeated) == _structure(full)


def test_every_attention_segment_reads_only_its_own_cache():
    """Sizes come from `tokens`, so at TP > 1 no segment takes another layer's cache as an input."""
    cfg = _cfg("gqa", TRACED_LAYERS + 2)
    cuts = partition(rank_graph(cfg, tp=2, dtype=Precision.FP32, max_batch=4))
    for cut in cuts:
        layers = {int(m.group(1)) for v in cut.model.graph.inputs if (m := re.fullmatch(r"past_\w+_(\d+)", v.name))}
        assert len(layers) <= 1, [v.name for v in cut.model.graph.inputs]
    shapes = [n for c in cuts for n in c.model.graph if n.op_type == "Shape" and n.inputs[0].is_graph_input()]
    assert shapes and all(n.inputs[0].name == schema.TOKENS for n in shapes)


def test_no_name_from_the_exporters_value_counter():
    g = rank_graph(_cfg("gqa", TRACED_LAYERS + 1), tp=1, dtype=Precision.FP32, max_batch=4).graph
    names = [*g.initializers, *(v.name for n in g for v in n.outputs)]
    assert not [n for n in names if re.match(r"val_\d+$", n) or "__layer" in n]


def test_layers_that_differ_are_not_repeated():
    cfg = _cfg("gqa", TRACED_LAYERS)
    from llama_export.export.exporter import _trace

    graph = _trace(cfg, tp=1, dtype=Precision.FP32, max_batch=4, rank=0)
    Pipeline(CleanupPass())(graph)
    norm = [n for n in graph.graph if n.op_type == schema.RMS_NORM][-2]  # the last layer's ffn_norm
    norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.5)
    with pytest.raises(NotRepeatable, match="differs from its predecessor"):
        RepeatLayersPass(cfg.n_layers + 2)(graph)


def test_export_falls_back_to_tracing_every_layer(monkeypatch, caplog):
    def refuse(self, model):
        raise NotRepeatable("test")

    monkeypatch.setattr(RepeatLayersPass, "call", refuse)
    cfg = _cfg("mha", TRACED_LAYERS + 1)
    with caplog.at_level(logging.WARNING):
        graph = rank_graph(cfg, tp=1, dtype=Precision.FP32, max_batch=2)
    assert "tracing all 4 layers" in caplog.text
    assert [v.name for v in graph.graph.inputs] == list(schema.graph_inputs(cfg.n_layers))


def test_repeated_export_matches_eager_on_ort(tmp_path):
    """A 5-layer model at TP=2, exported through the repeat path, against the eager model."""
    cfg = _cfg("gqa", TRACED_LAYERS + 2)
    ckpt = write_meta(tmp_path / "gqa5", cfg, random_meta_state(cfg, seed=5))
    out = export(ExportOptions(checkpoint=ckpt, out=tmp_path / "graphs", tp=2, progress=False))
    cmp = validate_export(out, ckpt)
    assert cmp.max_abs <= TOLERANCES[Precision.FP32].logits_atol, str(cmp)
    assert cmp.tokens_agree == 1.0, str(cmp)
