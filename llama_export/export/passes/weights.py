"""Pass: attach weights to a weightless segment, folding weight transposes as it goes.

    before                                          after
    layers.0.attention.wq.weight  (placeholder)     layers.0.attention.wq.weight_t  [dim, local_q]
        └─► Transpose(perm=[1,0]) ─► MatMul   ──►       └─► MatMul
    rope_cos (placeholder)                           rope_cos [max_seq_len, head_dim/2] fp32

Traced graphs carry only placeholders (`trace.WEIGHTS_PLACEHOLDER`); this pass fetches each tensor by
name when its segment is written, so an export holds one segment's weights at a time, never a rank's.
A weight read only by a 2-D Transpose is stored transposed and the Transpose is removed (the constant
folding the exporter's optimizer would do, done here per tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from torch import Tensor

from llama_export.errors import ArtifactError
from llama_export.export.trace import WEIGHTS_PLACEHOLDER


def is_placeholder(init: onnx.TensorProto) -> bool:
    return init.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == WEIGHTS_PLACEHOLDER for e in init.external_data)


def placeholder_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.initializer if is_placeholder(i)]


def _fill(init: onnx.TensorProto, t: Tensor, name: str) -> None:
    want = tuple(init.dims)
    if tuple(t.shape) != want:
        raise ArtifactError(f"weight {name} has shape {tuple(t.shape)} but the graph expects {want}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if t.dtype == torch.bfloat16:
        if init.data_type != onnx.TensorProto.BFLOAT16:
            raise ArtifactError(f"weight {name} is bf16 but the graph expects {dtype}")
        raw = t.contiguous().view(torch.int16).numpy().tobytes()
    else:
        raw = np.ascontiguousarray(t.numpy()).astype(dtype, copy=False).tobytes()
    del init.external_data[:]
    init.data_location = onnx.TensorProto.DEFAULT
    init.raw_data = raw


def attach_weights(model: onnx.ModelProto, fetch: Callable[[str], Tensor]) -> onnx.ModelProto:
    """Fill every placeholder of `model` in place with `fetch(name)` (a CPU tensor); returns `model`."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    renames: dict[str, str] = {}
    for init in g.initializer:
        if not is_placeholder(init):
            continue
        name = init.name
        t = fetch(name).detach().cpu()
        users = consumers.get(name, [])
        tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None) if tr else None
        if tr is not None and t.dim() == 2 and perm in (None, [1, 0]) and tr.output[0] not in outputs:
            t = t.t().contiguous()
            init.dims[:] = list(t.shape)
            new = f"{name}_t"
            renames[tr.output[0]] = new
            drop.add(id(tr))
            init.name = new
        _fill(init, t, name)
    if drop:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        for node in g.node:
            node.input[:] = [renames.get(x, x) for x in node.input]
        vi = [v for v in g.value_info if v.name not in renames]
        del g.value_info[:]
        g.value_info.extend(vi)
    left = placeholder_names(model)
    if left:
        raise ArtifactError(f"weights {left[:3]} were not attached")
    return model
