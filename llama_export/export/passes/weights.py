"""Pass: attach a weightless segment's weights (lazily, folding transposes); `artifact.segments` streams
them to disk.

    AttachWeightsPass                               artifact.segments.write_external_data
    layers.0.attention.wq.weight  (placeholder)     layers.0.attention.wq.weight_t  [dim, local_q]
        └─► Transpose(perm=[1,0]) ─► MatMul   ──►       └─► MatMul      (external data: seg.onnx.data @ 0)
    rope_cos (placeholder)                           rope_cos [max_seq_len, head_dim/2] fp32 (external)

Traced graphs carry only placeholders (`passes.placeholders`). `AttachWeightsPass` replaces each with an
`ir.LazyTensor` that reads the checkpoint when its bytes are asked for (and transposes them when a 2-D
Transpose is the weight's only reader: the Transpose is removed, the constant folding the exporter's
optimizer would do), so passes that rewrite weights structurally (`passes.quantize`) run before any
weight is read. Writing them (`artifact.segments.write_external_data`) evaluates one lazy tensor at a
time, so an export holds one weight tensor (and its transposed copy) at a time, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from torch import Tensor

from llama_export import dtypes
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pass
from llama_export.export.passes.placeholders import is_placeholder, placeholder_names

def _checked(t: Tensor, placeholder: ir.TensorProtocol, name: str) -> Tensor:
    """`t` checked against the placeholder's shape and dtype (fp32/fp16 mismatches are cast)."""
    want = tuple(placeholder.shape)
    if tuple(t.shape) != want:
        raise ArtifactError(f"weight {name} has shape {tuple(t.shape)} but the graph expects {want}")
    want_dtype = dtypes.by_onnx(int(placeholder.dtype))
    if t.dtype != want_dtype.torch:
        if torch.bfloat16 in (t.dtype, want_dtype.torch):
            raise ArtifactError(f"weight {name} is {t.dtype} but the graph expects {want_dtype.name}")
        t = t.to(want_dtype.torch)
    return t.contiguous()


def _reader(fetch: Callable[[str], Tensor], name: str, placeholder: ir.TensorProtocol, transpose: bool):
    def read() -> ir.TensorProtocol:
        t = _checked(fetch(name).detach().cpu(), placeholder, name)
        return ir.tensor_adapters.TorchTensor(t.t().contiguous() if transpose else t)
    return read


class AttachWeightsPass(Pass, ir.passes.InPlacePass):
    """Point every placeholder at `fetch(name)` (a CPU tensor, read when needed), folding transposes."""

    def __init__(self, fetch: Callable[[str], Tensor]) -> None:
        self.fetch = fetch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        outputs = set(g.outputs)
        order = list(g.initializers.values())
        for value in order:
            if not is_placeholder(value):
                continue
            name, placeholder = value.name, value.const_value
            users = [node for node, _ in value.uses()]
            tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
            perm = list(tr.attributes["perm"].as_ints()) if tr is not None and "perm" in tr.attributes else None
            fold = tr is not None and len(placeholder.shape) == 2 and perm in (None, [1, 0]) \
                and tr.outputs[0] not in outputs
            shape = ir.Shape(list(reversed(placeholder.shape)) if fold else list(placeholder.shape))
            if fold:
                ir.convenience.replace_all_uses_with(tr.outputs[0], value)
                g.remove(tr, safe=True)
                value.name = f"{name}_t"
                value.shape = shape
            value.const_value = ir.LazyTensor(_reader(self.fetch, name, placeholder, fold), dtype=placeholder.dtype,
                                              shape=shape, name=value.name)
        # Renaming moves an initializer to the end of the graph's table; keep the traced order.
        g.initializers.clear()
        for value in order:
            g.initializers[value.name] = value
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        left = placeholder_names(model)
        if left:
            raise ArtifactError(f"weights {left[:3]} were not attached")


def lazy_bytes(model: ir.Model) -> int:
    """Bytes `artifact.segments.write_external_data` will write for `model` (without alignment padding)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.LazyTensor))
