"""Segment files: a graph and its weights as ONNX external data, written by the exporter (the canonical
segments) and by backends that write a lowering beside them (`backends/ort/prelower.py`).

Weights are streamed one tensor at a time: each lazy initializer (`ir.LazyTensor`) is evaluated, its
bytes appended to the data file (unbuffered, hashed on the way in a second thread) at the offsets of
`schema.data_offset`, and the initializer pointed at them (`ir.ExternalTensor`), so a writer holds one
weight tensor at a time whatever the model size. Saving the graph afterwards keeps those references.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.errors import ArtifactError

# Element types onnx_ir stores two to a byte: their bytes come from `tobytes()`, which packs them.
_PACKED = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1}


def write_external_data(model: ir.Model, data_path: Path, *,
                        on_bytes: Callable[[int], None] = lambda n: None) -> tuple[str, int]:
    """Stream every lazy initializer of `model` into `data_path` (in the folder the model will be saved
    to: its name is the external-data location); `on_bytes(n)` after each tensor. Returns the file's
    sha256, computed while writing, and its size."""
    data_path = Path(data_path)
    digest = hashlib.sha256()
    offset = 0
    # Hashing runs beside the write of the same bytes (both release the GIL): the export's time is
    # read + max(write, hash) per tensor, and memory still holds one tensor at a time.
    with open(data_path, "wb", buffering=0) as f, ThreadPoolExecutor(1) as hasher:
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
                data_path.name, offset=start, length=len(raw), dtype=lazy.dtype, shape=lazy.shape,
                name=value.name, base_dir=data_path.parent)
            offset = start + len(raw)
            on_bytes(len(raw))
            del raw
    return digest.hexdigest(), offset


def write_segment(model: ir.Model, root: Path, rel: str, *,
                  on_bytes: Callable[[int], None] = lambda n: None) -> tuple[str, str | None, str | None]:
    """Stream one segment's lazy weights to `rel + DATA_SUFFIX` (`on_bytes(n)` after each tensor), then
    write its graph to `rel` and check both. Returns (sha256 of the .onnx, the relative data file or None
    when there were no lazy weights, its sha256); both hashes are computed while writing, not by reading
    the files back. Used for the canonical segments and for backend lowerings written beside them."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data_rel = rel + schema.DATA_SUFFIX
    data_sha, nbytes = write_external_data(model, root / data_rel, on_bytes=on_bytes)
    graph = ir.to_proto(model).SerializeToString()  # external tensors are referenced, not read
    path.write_bytes(graph)
    schema.check_model(path)  # by path: the checker resolves the external data next to the graph
    if nbytes == 0:
        (root / data_rel).unlink()
        return hashlib.sha256(graph).hexdigest(), None, None
    return hashlib.sha256(graph).hexdigest(), data_rel, data_sha


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
