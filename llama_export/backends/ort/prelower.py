"""Lower an export for ONNX Runtime once, at export time, and write it beside the canonical graphs.

    rank0/00_full.onnx           canonical graph (custom nodes)     ─┐
    rank0/00_full.onnx.data      its weights                         ├─ read by the lowered graph
    rank0/00_full.ort.onnx       lowered graph (GroupQueryAttention, MatMulNBits, ...; `lowering.py`)
    rank0/00_full.ort.onnx.data  weights the lowering repacked (quantized exports only)

The lowered graph refers to the canonical data file for every weight it keeps, so an fp32 export gains
a few hundred KiB, and a quantized one the repacked copy of its quantized weights (`weight_only.py`).
`OrtBackend` then creates its sessions from these files: ONNX Runtime reads the weights itself, and the
run imports neither onnx_ir nor torch and repacks nothing. The manifest records the files and their
hashes (`Segment.ort`); the canonical graphs stay the contract every other backend reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llama_export.artifact.manifest import MANIFEST_NAME, LoweredFiles, Manifest, resolve_inside
from llama_export.backends.ort.lowering import lower_segment
from llama_export.backends.ort.weight_only import DEFAULT_ACCURACY_LEVEL
from llama_export.artifact.segments import write_segment

SUFFIX = ".ort.onnx"


def write_lowered(root: Path, manifest: Manifest) -> Manifest:
    """Write every segment's ONNX Runtime lowering into the export at `root` (a staging folder) and
    rewrite its manifest to list them; returns the new manifest."""
    ranks = []
    for r in manifest.ranks:
        segments = []
        for seg in r.segments:
            model = lower_segment(resolve_inside(root, seg.file), DEFAULT_ACCURACY_LEVEL)
            rel = seg.file.removesuffix(".onnx") + SUFFIX
            # as the exporter writes a segment: the repacked (lazy) weights one at a time into rel's data
            # file, references to the canonical data file kept, the graph checked
            sha, data_rel, data_sha = write_segment(model, Path(root), rel)
            segments.append(dataclasses.replace(seg, ort=LoweredFiles(file=rel, sha256=sha, data_file=data_rel,
                                                                      data_sha256=data_sha)))
        ranks.append(dataclasses.replace(r, segments=tuple(segments)))
    manifest = dataclasses.replace(manifest, ranks=tuple(ranks))
    (Path(root) / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
