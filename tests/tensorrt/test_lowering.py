"""The TensorRT lowering pass: plugin attributes on every custom node, no shadowing functions."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from llama_export.artifact import schema
from llama_export.backends.tensorrt import lowering
from llama_export.errors import ArtifactError
from tests.tensorrt.graphs import attention_like_segment


def lower_for_tensorrt(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A lowered copy of `proto` (the pass rewrites an onnx_ir model in place)."""
    model = ir.from_proto(proto)
    lowering.TensorRTLoweringPass()(model)
    return ir.to_proto(model)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_custom_nodes_get_plugin_attributes_and_functions_go() -> None:
    model = attention_like_segment(0, seed=0)
    lowered = lower_for_tensorrt(model)
    schema.check_model(lowered)
    custom = [n for n in lowered.graph.node if n.domain == schema.DOMAIN]
    assert [n.op_type for n in custom] == ["RMSNorm"]
    a = _attrs(custom[0])
    assert a["plugin_namespace"] == b"llama_export" and a["plugin_version"] == b"1"
    assert a["epsilon"] == pytest.approx(1e-5)
    # RoPE (per-row positions) becomes TensorRT's own rotary layer: standard RotaryEmbedding.
    (rotary,) = [n for n in lowered.graph.node if n.op_type == "RotaryEmbedding"]
    assert _attrs(rotary)["interleaved"] == 1 and _attrs(rotary)["num_heads"] == 2
    assert len(lowered.functions) == 0
    # The nodes before RoPE are untouched, and the input model not modified.
    assert [n.SerializeToString() for n in lowered.graph.node[1:3]] == [
        n.SerializeToString() for n in model.graph.node[1:3]
    ]
    assert list(lowered.graph.initializer) == list(model.graph.initializer)
    assert len(model.functions) == 1 and "plugin_namespace" not in _attrs(model.graph.node[0])


def test_lowering_is_idempotent() -> None:
    once = lower_for_tensorrt(attention_like_segment(0, seed=0))
    assert lower_for_tensorrt(once).SerializeToString() == once.SerializeToString()


def test_unrelated_functions_are_kept() -> None:
    model = attention_like_segment(0, seed=0, fn=False)
    model.functions.append(helper.make_function(
        "other", "Helper", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 21)]
    ))
    assert [f.name for f in lower_for_tensorrt(model).functions] == ["Helper"]


@pytest.mark.parametrize("op", schema.COLLECTIVE_OPS)
def test_collective_marker_is_an_error(op: str) -> None:
    model = attention_like_segment(0, seed=0)
    model.graph.node.append(helper.make_node(op, ["y"], ["z"], name="/marker", domain=schema.DOMAIN, world_size=2))
    with pytest.raises(ArtifactError, match="collectives"):
        lower_for_tensorrt(model)


def test_lower_file_round_trip(tmp_path) -> None:
    src, dst = tmp_path / "seg.onnx", tmp_path / "seg.trt.onnx"
    onnx.save(attention_like_segment(1, seed=1), str(src))
    lowering.lower_file(src, dst)
    lowered = onnx.load(str(dst))
    assert all({a.name for a in n.attribute} >= set(lowering.PLUGIN_ATTRIBUTES)
               for n in lowered.graph.node if n.domain == schema.DOMAIN)


def test_lower_file_of_an_external_data_segment_writes_its_own_weights(tmp_path) -> None:
    """Exported segments keep their weights in `<file>.data`; the lowered copy, written elsewhere,
    must carry its own (a reference to the source's data file would not resolve beside it)."""
    (tmp_path / "export").mkdir()
    (tmp_path / "build").mkdir()
    src, dst = tmp_path / "export" / "seg.onnx", tmp_path / "build" / "seg.trt.onnx"
    model = attention_like_segment(1, seed=1)
    want = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    onnx.save(model, str(src), save_as_external_data=True, location="seg.onnx.data", size_threshold=0)
    lowering.lower_file(src, dst)
    (tmp_path / "export" / "seg.onnx.data").unlink()  # the lowered copy must not need it
    lowered = onnx.load(str(dst))
    got = {i.name: onnx.numpy_helper.to_array(i) for i in lowered.graph.initializer}
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
