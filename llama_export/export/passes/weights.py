"""Pass: attach weights to a weightless segment, folding weight transposes as it goes.

    before                                          after
    layers.0.attention.wq.weight  (placeholder)     layers.0.attention.wq.weight_t  [dim, local_q]
        └─► Transpose(perm=[1,0]) ─► MatMul   ──►       └─► MatMul
    rope_cos (placeholder)                           rope_cos [max_seq_len, head_dim/2] fp32

Traced graphs carry only placeholders (`passes.placeholders`); this pass fetches each tensor by name
when its segment is written, so an export holds one segment's weights at a time, never a rank's. A
weight read only by a 2-D Transpose is stored transposed and the Transpose is removed (the constant
folding the exporter's optimizer would do, done here per tensor).
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


def _tensor(t: Tensor, placeholder: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    """`t` checked against the placeholder's shape and dtype (fp32/fp16 mismatches are cast)."""
    want = tuple(placeholder.shape)
    if tuple(t.shape) != want:
        raise ArtifactError(f"weight {name} has shape {tuple(t.shape)} but the graph expects {want}")
    want_dtype = dtypes.by_onnx(int(placeholder.dtype))
    if t.dtype != want_dtype.torch:
        if torch.bfloat16 in (t.dtype, want_dtype.torch):
            raise ArtifactError(f"weight {name} is {t.dtype} but the graph expects {want_dtype.name}")
        t = t.to(want_dtype.torch)
    return ir.tensor_adapters.TorchTensor(t.contiguous())


class AttachWeightsPass(Pass, ir.passes.InPlacePass):
    """Fill every placeholder with `fetch(name)` (a CPU tensor), folding weight transposes."""

    def __init__(self, fetch: Callable[[str], Tensor]) -> None:
        self.fetch = fetch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        outputs = set(g.outputs)
        order = list(g.initializers.values())
        for value in order:
            if not is_placeholder(value):
                continue
            name = value.name
            t = self.fetch(name).detach().cpu()
            placeholder = value.const_value
            users = [node for node, _ in value.uses()]
            tr = users[0] if len(users) == 1 and users[0].op_type == "Transpose" else None
            perm = list(tr.attributes["perm"].as_ints()) if tr is not None and "perm" in tr.attributes else None
            if tr is not None and t.dim() == 2 and perm in (None, [1, 0]) and tr.outputs[0] not in outputs:
                t = _tensor(t, placeholder, name).raw.t().contiguous()
                ir.convenience.replace_all_uses_with(tr.outputs[0], value)
                g.remove(tr, safe=True)
                value.name = f"{name}_t"
                value.shape = ir.Shape(t.shape)
                value.const_value = ir.tensor_adapters.TorchTensor(t)
            else:
                value.const_value = _tensor(t, placeholder, name)
        # Renaming moves an initializer to the end of the graph's table; keep the traced order.
        g.initializers.clear()
        for value in order:
            g.initializers[value.name] = value
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        left = placeholder_names(model)
        if left:
            raise ArtifactError(f"weights {left[:3]} were not attached")
