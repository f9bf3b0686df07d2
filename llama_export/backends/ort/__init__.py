"""ONNX Runtime backend: one InferenceSession per segment of one rank.

Sessions are created from the canonical custom-node graphs, lowered in memory (`lowering.py`, and
`weight_only.py` for quantized weights).
onnxruntime is imported lazily, so that importing llama_export never needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor

from llama_export.artifact.manifest import Manifest, resolve_inside
from llama_export.errors import ArtifactError, BackendUnavailableError

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from None
    return onnxruntime


class OrtBackend:
    """RankBackend over ONNX Runtime sessions (CPU execution provider; CUDA where onnxruntime-gpu is)."""

    def __init__(self, manifest: Manifest, root: Path, *, rank: int, device: torch.device,
                 threads: int | None = None, extra_outputs: tuple[str, ...] = (), exact: bool = False) -> None:
        """`exact`: run quantized weights with the canonical graph's arithmetic (fp32 compute,
        `EXACT_ACCURACY_LEVEL`) instead of the fast int8-activation kernels (see `weight_only.py`)."""
        from llama_export.backends.ort.lowering import OrtLoweringPass
        from llama_export.backends.ort.weight_only import (
            DEFAULT_ACCURACY_LEVEL,
            EXACT_ACCURACY_LEVEL,
            WeightOnlyLoweringPass,
        )

        ort = _ort()
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "--device cuda with the ort backend needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                    "this onnxruntime has only " + ", ".join(ort.get_available_providers()))
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), *providers]
        opts = _session_options(ort, threads)
        self.sessions = []
        self.output_names: list[list[str]] = []
        self.segments = manifest.rank(rank).segments
        for seg in self.segments:
            path = resolve_inside(root, seg.file)
            try:
                # External weights (graphs over 2 GB) stay on disk: the lowered graph refers to them.
                lowered = ir.load(str(path))
            except Exception as e:  # protobuf DecodeError and friends
                raise ArtifactError(f"{seg.file} is not a readable ONNX model ({type(e).__name__}); re-export") from None
            OrtLoweringPass()(lowered)
            WeightOnlyLoweringPass(EXACT_ACCURACY_LEVEL if exact else DEFAULT_ACCURACY_LEVEL)(lowered)
            names = [o.name for o in seg.outputs] + _expose(lowered, extra_outputs)
            self.output_names.append(names)
            seg_opts = opts
            if seg.data_file is not None:
                seg_opts = _session_options(ort, threads)
                seg_opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(path.parent))
            self.sessions.append(
                ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), sess_options=seg_opts,
                                     providers=providers))
        log.info("rank %d: %d ONNX Runtime sessions on %s", rank, len(self.sessions), providers[0])

    def run_segment(self, index: int, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        names = self.output_names[index]
        np_feeds = {name: _to_numpy(t) for name, t in feeds.items()}
        outs = self.sessions[index].run(names, np_feeds)
        return {name: torch.from_numpy(v).to(self.device) for name, v in zip(names, outs)}

    def close(self) -> None:
        self.sessions.clear()

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expose(model: ir.Model, names: tuple[str, ...]) -> list[str]:
    """Make those of `names` that are typed values inside `model` graph outputs; returns them."""
    g = model.graph
    present = {o.name for o in g.outputs}
    inner = {v.name: v for node in g for v in node.outputs if v.type is not None}
    added = []
    for name in names:
        if name in inner and name not in present:
            g.outputs.append(inner[name])
            added.append(name)
    return added


def _session_options(ort, threads: int | None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The rank decided its thread count (runner.launch.rank_threads, applied with torch.set_num_threads).
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return opts


def _to_numpy(t: Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise BackendUnavailableError("ONNX Runtime's CPU provider has no bf16 kernels; export fp32 or fp16")
    return t.detach().cpu().contiguous().numpy()
