"""Passes: attach a weightless segment's weights (lazily, folding transposes), then stream them to disk.

    AttachWeightsPass                               WriteWeightsPass
    layers.0.attention.wq.weight  (placeholder)     layers.0.attention.wq.weight_t  [dim, local_q]
        └─► Transpose(perm=[1,0]) ─► MatMul   ──►       └─► MatMul      (external data: seg.onnx.data @ 0)
    rope_cos (placeholder)                           rope_cos [max_seq_len, head_dim/2] fp32 (external)

Traced graphs carry only placeholders (`passes.placeholders`). `AttachWeightsPass` replaces each with an
`ir.LazyTensor` that reads the checkpoint when its bytes are asked for (and transposes them when a 2-D
Transpose is the weight's only reader: the Transpose is removed, the constant folding the exporter's
optimizer would do), so passes that rewrite weights structurally (`passes.quantize`) run before any
weight is read. `WriteWeightsPass` then evaluates one lazy tensor at a time, appends its bytes to the
segment's data file (unbuffered, hashing them on the way, in a second thread) and points the initializer at them
(`ir.ExternalTensor`), dropping the tensor before reading the next: an export holds one weight tensor
(and its transposed copy) at a time, whatever the model size. Offsets follow `artifact.schema.data_offset`.
Saving the model afterwards keeps these references, so the `.onnx` holds only the graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from llama_export import dtypes
from llama_export.artifact import schema
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pass
from llama_export.export.passes.placeholders import is_placeholder, placeholder_names

# Element types onnx_ir stores two to a byte: their bytes come from `tobytes()`, which packs them.
_PACKED = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1}


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
    """Bytes `WriteWeightsPass` will write for `model` (without alignment padding)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.LazyTensor))


class WriteWeightsPass(Pass, ir.passes.InPlacePass):
    """Stream every lazy initializer into `data_path`, one tensor at a time, as external data.

    `data_path` sits in the folder the model will be saved to (its name is the external-data location).
    `on_bytes(n)` is called after each tensor is written (progress). After the call, `sha256` is the
    data file's hash, computed while writing, and `nbytes` its size.
    """

    def __init__(self, data_path: Path, *, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        self.data_path = Path(data_path)
        self.on_bytes = on_bytes
        self.sha256 = ""
        self.nbytes = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        digest = hashlib.sha256()
        offset = 0
        # Hashing runs beside the write of the same bytes (both release the GIL): the export's time is
        # read + max(write, hash) per tensor, and memory still holds one tensor at a time.
        with open(self.data_path, "wb", buffering=0) as f, ThreadPoolExecutor(1) as hasher:
            for value in model.graph.initializers.values():
                lazy = value.const_value
                if not isinstance(lazy, ir.LazyTensor):
                    continue
                raw = _bytes(lazy.raw())
                if len(raw) != lazy.nbytes:
                    raise ArtifactError(f"{value.name}: {len(raw)} bytes read, {lazy.nbytes} expected")
                start = schema.data_offset(offset, len(raw))
                for chunk in (memoryview(bytes(start - offset)), raw):
                    hashed = hasher.submit(digest.update, chunk)
                    _write_all(f, chunk)
                    hashed.result()
                value.const_value = ir.ExternalTensor(
                    self.data_path.name, offset=start, length=len(raw), dtype=lazy.dtype, shape=lazy.shape,
                    name=value.name, base_dir=self.data_path.parent)
                offset = start + len(raw)
                self.on_bytes(len(raw))
                del raw
        self.sha256, self.nbytes = digest.hexdigest(), offset
        return ir.passes.PassResult(model, modified=offset > 0)


def _bytes(tensor: ir.TensorProtocol) -> memoryview:
    """A tensor's bytes as ONNX stores them, without a copy where the layout allows."""
    if tensor.dtype in _PACKED:
        return memoryview(tensor.tobytes())
    arr = np.ascontiguousarray(tensor.numpy())
    return memoryview(arr.reshape(-1).view(np.uint8))


def _write_all(f, buf: memoryview) -> None:
    """Unbuffered writes may be short (Linux moves at most ~2 GiB per call): loop until all is out."""
    while buf:
        buf = buf[f.write(buf):]
