"""Our plugins through the real tensorrt.plugin 11.4 code, created as the ONNX parser creates them.

`register_plugins()` runs against the real package (a failed first attempt included); then for every
custom node of a lowered export in fp32, fp16 and bf16 the plugin is created from the node as the
11.4 parser's fallback importer does (tensorrt_side.py) and driven the way the builder drives it:
output types and shapes against the exported graph's own, the format combination a strongly typed
network needs, configure / tactics; AOT: launch parameters and the kernel, whose PTX entry must take
exactly what TensorRT passes; JIT: fields serialized into the engine, the plugin re-created from them
at run time and enqueued on host buffers, compared with the torch reference. Only TensorRT's C++
objects are faked (fakes.py); GPU launches are replaced by the reference op on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from llama_export.backends.tensorrt import aot, build, lowering, plugins
from llama_export.config import ModelConfig, Precision, meta_ffn_hidden_dim
from llama_export.errors import BackendUnavailableError
from llama_export.artifact import schema
from llama_export.artifact.manifest import load_manifest, resolve_inside
from llama_export.export.exporter import ExportOptions, export
from llama_export.model.ops import rms_norm_reference, rope_reference
from tests.helpers import random_meta_state, write_meta
from tests.tensorrt.conformance import tensorrt_side as side

SIZES = {"batch": 2, "seq": 3, "capacity": 8}  # concrete values of the exported symbolic dims
STARTS = [0, 5]  # RoPE's start per row: ragged, start + seq <= capacity


def _size(d: int | str) -> int:
    # Exported dims are ints, names, or sympy-style expressions of the names ("Max(0, -past + ...)").
    return d if isinstance(d, int) else int(eval(d, {"__builtins__": {}, "Max": max, "Min": min}, dict(SIZES)))


@pytest.fixture(scope="session")
def registered(trt_modules: tuple[Any, Any], registry: Any) -> dict[str, Any]:
    """register_plugins(), first with tensorrt.plugin failing halfway (RoPE's JIT impl), then again."""
    _, trtp = trt_modules
    seen: dict[str, Any] = {}
    real_impl = trtp.impl

    def failing_impl(plugin_id: str):
        if plugin_id == plugins.ROPE_ID:
            raise ValueError("simulated rejection of the RoPE impl")
        return real_impl(plugin_id)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trtp, "impl", failing_impl)
        with pytest.raises(BackendUnavailableError) as e:
            plugins.register_plugins()
    seen["first_error"] = str(e.value)
    seen["creators_after_failure"] = sorted(registry._creators)
    plugins.register_plugins()
    plugins.register_plugins()  # idempotent
    seen["creators"] = sorted(registry._creators)
    return seen


def test_registration_completes_after_a_failed_attempt(registered: dict[str, Any], trt_modules: tuple[Any, Any]) -> None:
    _, trtp = trt_modules
    assert "simulated rejection" in registered["first_error"]
    keys = [(schema.RMS_NORM, "1", schema.DOMAIN), (schema.ROPE, "1", schema.DOMAIN)]
    assert registered["creators_after_failure"] == registered["creators"] == keys
    for name in (schema.RMS_NORM, schema.ROPE):
        definition = getattr(getattr(trtp.op, schema.DOMAIN), name)
        assert definition.impl_func is not None and definition.aot_impl_func is not None
        assert definition.autotune_func is not None


@pytest.fixture(scope="session")
def lowered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    """A tiny GQA model exported at TP=1 in fp32, fp16 and bf16, each graph lowered for TensorRT."""
    root = tmp_path_factory.mktemp("export")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                      hidden_dim=meta_ffn_hidden_dim(32, 16, None), max_seq_len=32)
    ckpt = write_meta(root / "ckpt", cfg, random_meta_state(cfg, seed=3))
    out = {}
    for dtype in (Precision.FP32, Precision.FP16, Precision.BF16):
        path = export(ExportOptions(checkpoint=ckpt, out=root / "graphs", tp=1, dtype=dtype, progress=False))
        (seg,) = load_manifest(path).rank(0).segments
        dst = root / f"{dtype.value}.trt.onnx"
        lowering.lower_file(resolve_inside(path, seg.file), dst)
        out[dtype.value] = onnx.load(str(dst))
    return out


class _Graph:
    """Types and symbolic shapes of a lowered graph's values, and its initializers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.values = {v.name: v.type.tensor_type for v in [*g.input, *g.output, *g.value_info]}
        self.inits = {t.name: t for t in g.initializer}

    def elem_type(self, name: str) -> int:
        return self.inits[name].data_type if name in self.inits else self.values[name].elem_type

    def dims(self, name: str) -> list[int | str]:
        if name in self.inits:
            return list(self.inits[name].dims)
        return [d.dim_param or d.dim_value for d in self.values[name].shape.dim]


def _custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = [n for n in model.graph.node if n.domain == schema.DOMAIN]
    assert {n.op_type for n in nodes} == set(lowering.PLUGIN_OPS)
    return nodes


def _build_side(trt: Any, registry: Any, graph: _Graph, node: onnx.NodeProto, *, aot_plugins: bool):
    """Parser + builder steps shared by AOT and JIT; returns (creator, plugin, input dims, descs)."""
    creator, plugin = side.parse_plugin_node(trt, registry, node, build.network_flags(trt, aot_plugins=aot_plugins))
    plugin = plugin.clone()  # the builder works on clones
    assert plugin.get_num_outputs() == len(node.output)
    in_types = [side.onnx_to_trt_dtype(trt, graph.elem_type(i)) for i in node.input]
    in_dims = [graph.dims(i) for i in node.input]
    out_types = plugin.get_output_data_types(in_types, [len(d) for d in in_dims])
    assert out_types == [side.onnx_to_trt_dtype(trt, graph.elem_type(o)) for o in node.output]
    out_exprs = side.output_shapes(plugin, in_dims)
    for o, exprs in zip(node.output, out_exprs):
        assert [e._evaluate({**SIZES, **_dim_names(in_dims)}) for e in exprs] == [_size(d) for d in graph.dims(o)]
    sizes = {**SIZES, **_dim_names(in_dims)}
    descs = [side.dynamic_desc(trt, t, d, sizes) for t, d in zip(in_types, in_dims)]
    descs += [side.dynamic_desc(trt, t, graph.dims(o), sizes) for t, o in zip(out_types, node.output)]
    combo = side.choose_combination(plugin, descs, len(in_types), [*in_types, *out_types])
    assert all(fmt == trt.TensorFormat.LINEAR for _, fmt in combo)
    side.configure(trt, plugin, descs, len(in_types))
    return creator, plugin, in_dims, descs


def _dim_names(dims: list[list[int | str]]) -> dict[str, int]:
    return {d: _size(d) for ds in dims for d in ds if isinstance(d, str)}


@pytest.fixture
def builder_side(trt_modules: tuple[Any, Any], registered: dict[str, Any], registry: Any,
                 expression_fakes: None) -> tuple[Any, Any]:
    """(tensorrt, registry) with our plugins registered and shape expressions faked."""
    return trt_modules[0], registry


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_aot_plugins_as_the_builder_drives_them(dtype: str, builder_side: tuple[Any, Any],
                                                lowered: dict[str, onnx.ModelProto]) -> None:
    trt, registry = builder_side
    graph = _Graph(lowered[dtype])
    for node in _custom_nodes(lowered[dtype]):
        _, plugin, in_dims, descs = _build_side(trt, registry, graph, node, aot_plugins=True)
        n_in = len(node.input)
        params, extra = side.launch_parameters(plugin, in_dims, descs, n_in)
        name, ptx = plugin.get_kernel([d.desc for d in descs[:n_in]], [d.desc for d in descs[n_in:]])
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        args = extra._values()
        assert all(a.type == trt.PluginArgType.INT and a.dtype == trt.PluginArgDataType.INT32 for a in args)
        # The PTX entry takes exactly what TensorRT passes: input pointers, the int32 extra args, outputs.
        want = [aot.POINTER] * n_in + [aot.INT32] * len(args) + [aot.POINTER] * len(node.output)
        assert [t for t, _ in aot.entry_params(ptx, name)] == want, node.name
        x = [_size(d) for d in in_dims[0]]
        value = lambda s: s.expr._evaluate(_dim_names(in_dims) | SIZES)  # noqa: E731
        # One program per row of the last dimension (RMSNorm rows; RoPE (b, s, h) rows).
        assert [value(params.grid_x), value(params.grid_y), value(params.grid_z)] == [math.prod(x[:-1]), 1, 1]
        block = [value(params.block_x), value(params.block_y), value(params.block_z)]
        assert block == [aot.reqntid(ptx), 1, 1] and value(params.shared_mem) >= 0
        # RoPE's extra args: the sequence length and the tables' rows (the model's max_seq_len).
        want_args = [x[1], graph.dims(node.input[1])[0]] if node.op_type == schema.ROPE else []
        assert [value(a) for a in args] == want_args, node.name


@contextlib.contextmanager
def _cpu_launches(trt: Any, seen: list[Any]):
    """The JIT impls' GPU steps on CPU: tensors over host memory, the reference op instead of Triton."""
    from llama_export.backends.tensorrt import kernels

    class HostArray:
        def __init__(self, iface: dict[str, Any]) -> None:
            self.__array_interface__ = {k: v for k, v in iface.items() if k != "stream"}

    def as_host_tensor(trt_: Any, t: Any) -> torch.Tensor:
        seen.append(t)
        iface, dtype = plugins.cuda_array_interface(trt_, t)
        storage = torch.from_numpy(np.asarray(HostArray(iface)))
        return storage if storage.dtype == dtype else storage.view(dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plugins, "_as_torch", as_host_tensor)
        mp.setattr(plugins, "_on_stream", lambda stream: contextlib.nullcontext())
        mp.setattr(kernels, "rms_norm", lambda x, w, eps, *, out: out.copy_(rms_norm_reference(x, w, eps)))
        mp.setattr(kernels, "rope", lambda x, c, s, start, il, *, out: out.copy_(rope_reference(x, c, s, start, il)))
        yield


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_jit_plugins_serialize_recreate_and_enqueue(dtype: str, builder_side: tuple[Any, Any],
                                                     lowered: dict[str, onnx.ModelProto]) -> None:
    trt, registry = builder_side
    graph = _Graph(lowered[dtype])
    torch_dtype = Precision(dtype).torch_dtype
    g = torch.Generator().manual_seed(0)
    for node in _custom_nodes(lowered[dtype]):
        creator, plugin, in_dims, descs = _build_side(trt, registry, graph, node, aot_plugins=False)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.name not in lowering.PLUGIN_ATTRIBUTES}
        stored = side.serialize_fields(plugin.get_fields_to_serialize())
        assert sorted(name for name, _, _ in stored) == sorted(attrs)
        # At run time the engine re-creates the plugin from the stored fields (assumed: a strict JIT request).
        runtime = creator.create_plugin(node.op_type, schema.DOMAIN, side.deserialize_fields(trt, stored),
                                        trt.TensorRTPhase.RUNTIME, trt.QuickPluginCreationRequest.STRICT_JIT)
        shapes = [tuple(_size(d) for d in dims) for dims in in_dims]
        if node.op_type == schema.RMS_NORM:
            w = onnx.numpy_helper.to_array(graph.inits[node.input[1]])
            inputs = [torch.randn(shapes[0], generator=g).to(torch_dtype),
                      torch.from_numpy(w.astype(np.float32)).to(torch_dtype)]
            want = rms_norm_reference(inputs[0], inputs[1], attrs["epsilon"])
        else:  # x, the model's own tables (initializers), start
            tables = [torch.from_numpy(onnx.numpy_helper.to_array(graph.inits[n]).copy()) for n in node.input[1:3]]
            inputs = [torch.randn(shapes[0], generator=g).to(torch_dtype), *tables, torch.tensor(STARTS)]
            assert [tuple(t.shape) for t in inputs] == shapes and inputs[3].dtype == torch.int64
            want = rope_reference(*inputs, bool(attrs["interleaved"]))
        out = torch.full_like(want, float("nan"))
        seen: list[Any] = []
        with _cpu_launches(trt, seen):
            runtime.enqueue(
                [side.plugin_tensor_desc(trt, d.desc.type, tuple(t.shape)) for d, t in zip(descs, inputs)],
                [side.plugin_tensor_desc(trt, descs[-1].desc.type, tuple(out.shape))],
                [t.data_ptr() for t in inputs], [out.data_ptr()],
                [t.stride() for t in inputs], [out.stride()], 0,
            )
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        for t in seen:  # our interface equals tensorrt.plugin's own wherever that one works (not BF16)
            ours = {k: v for k, v in plugins.cuda_array_interface(trt, t)[0].items() if k != "stream"}
            if t.dtype == trt.bfloat16:
                with pytest.raises(ValueError, match="not supported"):
                    t.__cuda_array_interface__
            else:
                theirs = {k: v for k, v in t.__cuda_array_interface__.items() if k != "stream"}
                assert ours == theirs
