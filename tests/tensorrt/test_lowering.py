"""The TensorRT lowering pass: RMSNorm / RoPE plugin nodes, Attention as TensorScatter + Attention in the
form onnx-tensorrt's importer accepts, no shadowing functions; and the lowered graphs of a real export run
on ONNX Runtime (plugin nodes replaced by their reference decomposition) against the eager model.

No TensorRT parser or engine runs here (see docs/tensorrt.md): the ORT run checks the lowering's math, the
rule checks below pin what onnx-tensorrt's source (10.15, `onnxOpImporters.cpp` / `onnxOpCheckers.cpp`)
requires of the nodes the lowering emits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from llama_export import dtypes
from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest, load_manifest, resolve_inside
from llama_export.backends.tensorrt import lowering
from llama_export.config import Precision
from llama_export.errors import ArtifactError
from llama_export.export.exporter import ExportOptions, export
from llama_export.export.reference import DecomposePass
from llama_export.model.checkpoint import build_model
from llama_export.parallel.comm import ThreadGroup
from llama_export.tolerances import TOLERANCES
from llama_export.engine.batch import generate
from llama_export.engine.generate import pad_prompts
from llama_export.runner.stitch import empty_cache, segmented_step
from tests.helpers import random_meta_state, tiny_config, write_meta
from tests.tensorrt.graphs import attention_like_segment


def lower_for_tensorrt(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A lowered copy of `proto` (the pass rewrites an onnx_ir model in place)."""
    model = ir.from_proto(proto)
    lowering.TensorRTLoweringPass()(model)
    return ir.to_proto(model)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_rms_norm_and_rope_become_plugin_nodes_and_functions_go() -> None:
    model = attention_like_segment(0, seed=0)
    lowered = lower_for_tensorrt(model)
    schema.check_model(lowered)
    custom = [n for n in lowered.graph.node if n.domain == schema.DOMAIN]
    assert [n.op_type for n in custom] == ["RMSNorm", "RoPE"]
    for n in custom:
        a = _attrs(n)
        assert a["plugin_namespace"] == b"llama_export" and a["plugin_version"] == b"1"
    assert _attrs(custom[0])["epsilon"] == pytest.approx(1e-5) and _attrs(custom[1])["interleaved"] == 1
    # The plugin takes the node's own inputs: the full tables and the int64 start, no Cast in between.
    assert list(custom[1].input) == ["q4", "cos", "sin", "start"]
    assert not {n.op_type for n in lowered.graph.node} & {"RotaryEmbedding", "Cast"}
    assert len(lowered.functions) == 0
    # Every other node is untouched, and the input model not modified.
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


# ---- a real export, lowered ----------------------------------------------------------------------------

ROWS = [[5, 17, 3, 99, 42, 7, 8], [11, 2], [60, 61, 62, 63, 64]]  # a ragged batch: lengths 7, 2, 5
NEW = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, object]:
    """The tiny GQA model (4 heads, 2 KV heads) exported at TP=2 in fp32 and at TP=1 in fp16."""
    root = tmp_path_factory.mktemp("trt_lowering")
    ckpt = write_meta(root / "ckpt", tiny_config("gqa"), random_meta_state(tiny_config("gqa"), seed=5))
    opts = {"fp32": (2, Precision.FP32), "fp16": (1, Precision.FP16)}
    return {"ckpt": ckpt, **{k: export(ExportOptions(checkpoint=ckpt, out=root / "g", tp=tp, dtype=dt, progress=False))
                            for k, (tp, dt) in opts.items()}}


def _lowered_segments(path, rank: int) -> list[onnx.ModelProto]:
    out = []
    for seg in load_manifest(path).rank(rank).segments:
        model = ir.from_proto(onnx.load(str(resolve_inside(path, seg.file))))
        lowering.TensorRTLoweringPass()(model)
        out.append(ir.to_proto(model))
    return out


@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_lower_file_marks_every_attention_decomposable(exported, which, tmp_path) -> None:
    """TensorRT builds an IAttention as one fused kernel unless it is marked decomposable (none likely for
    fp32): every Attention of a written lowering carries TRT_decomposable=1, which is all that differs
    from the checked graph, and its weights still load."""
    path = exported[which]
    seg = next(s for s in load_manifest(path).rank(0).segments if s.kind in ("attention", "full"))
    dst = tmp_path / "seg.trt.onnx"
    lowering.lower_file(resolve_inside(path, seg.file), dst)
    written = onnx.load(str(dst))  # with its external data
    attention = [n for n in written.graph.node if n.op_type == "Attention" and n.domain == ""]
    assert attention and all(_attrs(n).get(lowering.DECOMPOSABLE) == 1 for n in attention)
    for n in attention:  # without the mark, the graph is the checked lowering
        kept = [a for a in n.attribute if a.name != lowering.DECOMPOSABLE]
        del n.attribute[:]
        n.attribute.extend(kept)
    schema.check_model(written)
    with pytest.raises(onnx.checker.ValidationError, match=lowering.DECOMPOSABLE):
        onnx.checker.check_model(onnx.load(str(dst)), full_check=True)  # the ONNX schema does not admit it


def _parser_rule_violations(model: onnx.ModelProto) -> list[str]:
    """What onnx-tensorrt's TensorScatter / Attention importers and checkers reject, for the nodes of `model`
    (ranks from ONNX shape inference on the graph with its plugin nodes decomposed)."""
    plain = ir.from_proto(model)
    DecomposePass()(plain)
    inferred = onnx.shape_inference.infer_shapes(ir.to_proto(plain), strict_mode=True)
    g = inferred.graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.output, *g.value_info]
            if v.type.tensor_type.HasField("shape")}
    bad = []
    for n in model.graph.node:
        a = _attrs(n)
        if n.op_type == "TensorScatter":
            # operators.md: "`axis` must be -2" (written as such, not as the equivalent 2)
            if [rank.get(x) for x in n.input[:2]] != [4, 4] or a.get("axis", -2) != -2:
                bad.append(f"{n.name}: TensorScatter needs 4-D cache/update and axis -2")
            if a.get("mode", b"linear") != b"linear":
                bad.append(f"{n.name}: TensorScatter mode must be linear")
        elif n.op_type == "Attention" and n.domain == "":
            if len(n.output) != 1 or len(n.input) > 4:
                bad.append(f"{n.name}: Attention with past/present I/O")
            if [rank.get(x) for x in n.input] != [4] * len(n.input):
                bad.append(f"{n.name}: Attention Q/K/V/mask must be 4-D")
            for name in ("softmax_precision", "softcap", "qk_matmul_output_mode"):
                if name in a:
                    bad.append(f"{n.name}: Attention attribute {name} is rejected")
        elif n.domain == schema.DOMAIN and n.op_type not in lowering.PLUGIN_OPS:
            bad.append(f"{n.name}: {n.op_type} has no plugin")
    return bad


@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_lowered_export_keeps_to_the_parser_rules(exported, which) -> None:
    path = exported[which]
    seen = set()
    for model in _lowered_segments(path, 0):
        schema.check_model(model)
        assert _parser_rule_violations(model) == []
        seen |= {(n.domain, n.op_type) for n in model.graph.node}
    assert {(schema.DOMAIN, "RMSNorm"), (schema.DOMAIN, "RoPE"), ("", "TensorScatter"), ("", "Attention")} <= seen
    assert (schema.DOMAIN, "Attention") not in seen and ("", "RotaryEmbedding") not in seen


def test_profiles_cover_every_segment_input(exported) -> None:
    """Every input of every v2 segment (tokens, cache_lengths, token_lengths, past_* of the pinned capacity,
    boundary values) gets prefill and decode ranges."""
    from llama_export.backends.tensorrt import profiles

    manifest = load_manifest(exported["fp32"])
    for seg in manifest.rank(1).segments:
        prefill, decode = profiles.plan_profiles(seg.inputs, max_batch=manifest.max_batch, max_seq_len=64)
        for spec in seg.inputs:
            lo, _, hi = prefill.shapes[spec.name]
            assert len(lo) == len(spec.shape) and decode.shapes[spec.name][2][0] == hi[0] == manifest.max_batch
            if spec.name in (schema.CACHE_LENGTHS, schema.TOKEN_LENGTHS):
                assert (lo, hi) == ((1,), (manifest.max_batch,))
            if spec.name.startswith("past_"):
                assert lo[2] == hi[2] == 64  # capacity pinned: TensorRT's KV-cache update wants it static


def test_parser_rule_check_catches_the_former_lowering(exported) -> None:
    """Guards the test above: the reference decomposition (fp32 softmax_precision) is what the parser refused."""
    from llama_export.export import reference

    (model,) = _lowered_segments(exported["fp16"], 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(lowering._STANDARD, schema.ATTENTION, reference.attention)
        (old,) = _lowered_segments(exported["fp16"], 0)
    assert _parser_rule_violations(model) == []
    assert any("softmax_precision is rejected" in v for v in _parser_rule_violations(old))


def test_lowered_tensor_scatter_writes_axis_minus_2(exported) -> None:
    """onnx-tensorrt's operators.md: TensorScatter "`axis` must be -2"; the former lowering wrote 2."""
    (model,) = _lowered_segments(exported["fp16"], 0)
    scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
    assert scatters and all(_attrs(n)["axis"] == -2 for n in scatters)
    for n in scatters:
        for a in n.attribute:
            if a.name == "axis":
                a.i = 2
    assert any("axis -2" in v for v in _parser_rule_violations(model))


class _LoweredOnOrt:
    """RankBackend: each segment lowered for TensorRT, its plugin nodes replaced by their reference
    decomposition (their own math is the kernels' tests' business), run by ONNX Runtime on CPU."""

    def __init__(self, path, rank: int) -> None:
        import onnxruntime as ort

        self.device = "cpu"
        self.sessions = []
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # not TensorScatter's warning that it copies the cache (CPU has no in-place)
        for model in _lowered_segments(path, rank):
            plain = ir.from_proto(model)
            DecomposePass()(plain)
            assert not any(n.domain == schema.DOMAIN for n in plain.graph)
            self.sessions.append(ort.InferenceSession(ir.to_proto(plain).SerializeToString(), opts,
                                                      providers=["CPUExecutionProvider"]))

    def run_segment(self, index: int, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.sessions[index]
        outs = s.run(None, {k: np.asarray(v) for k, v in feeds.items()})
        return {o.name: torch.from_numpy(np.ascontiguousarray(v)) for o, v in zip(s.get_outputs(), outs)}

    def zeros(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtypes.by_name(dtype).torch)


def _generate(step_for_rank, tp: int, manifest: Manifest | None):
    prompt, lengths = pad_prompts(ROWS)
    capacity = tiny_config("gqa").max_seq_len  # TensorRT profiles pin the capacity to max_seq_len

    def rank_fn(rank, comm):
        step, cache = step_for_rank(rank, comm, capacity)
        return generate(step, prompt, cache, max_new_tokens=NEW, prompt_lengths=lengths)

    return ThreadGroup(tp).run(rank_fn)[0]


@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_lowered_export_on_ort_matches_eager_on_a_ragged_batch(exported, which) -> None:
    """Prefill of a right-padded ragged batch and decode steps: logits and greedy tokens against eager
    (TP=1, same dtype); tolerances of llama_export/tolerances.py."""
    path, ckpt = exported[which], exported["ckpt"]
    manifest = load_manifest(path)
    dtype = manifest.dtype

    def lowered(rank, comm, capacity):
        be = _LoweredOnOrt(path, rank)
        return segmented_step(manifest, be, comm=comm), empty_cache(manifest, rank, len(ROWS), capacity,
                                                                    backend=be)

    def eager(rank, comm, capacity):
        model = build_model(ckpt, comm=comm, dtype=dtype.torch_dtype)
        return model.step, model.empty_cache(len(ROWS), capacity)

    got, want = _generate(lowered, manifest.tp, manifest), _generate(eager, 1, None)
    assert np.array_equal(got.new_tokens, want.new_tokens)
    err = max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(got.steps, want.steps))
    assert err <= TOLERANCES[dtype].logits_atol, f"max abs logits error {err:.2e}"
    assert len(got.steps) == NEW and len({tuple(r) for r in got.new_tokens.tolist()}) == len(ROWS)
