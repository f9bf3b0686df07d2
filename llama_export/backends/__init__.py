"""Backends behind one interface (`base.RankBackend`), and the registry that opens them.

    backend   artifacts directory                    manifest read from
    ort       an export (`llama-export export`)      manifest.json
    trt       engines (`llama-export build`)         export_manifest.json, copied in by the build

The eager model is not a segment backend: the runner uses it directly as a step function. Importing
this package imports neither onnxruntime nor tensorrt.
"""

from __future__ import annotations

from pathlib import Path

from llama_export.artifact.manifest import Manifest
from llama_export.backends.base import RankBackend
from llama_export.config import Backend
from llama_export.errors import BackendUnavailableError, InputError


def artifact_manifest(backend: Backend, root: Path, *, verify_hashes: bool = True, rehash: bool = False) -> Manifest:
    """The export manifest behind `root` for `backend` (trt: the copy inside the engine directory).
    `verify_hashes`, `rehash`: ort only, as in `load_manifest`."""
    if backend is Backend.ORT:
        from llama_export.artifact.manifest import load_manifest

        return load_manifest(root, verify_hashes=verify_hashes, rehash=rehash)
    if backend is Backend.TENSORRT:
        from llama_export.backends.tensorrt.plugins import import_tensorrt
        from llama_export.backends.tensorrt.runner import load_export_manifest

        import_tensorrt()  # say what to install before anything else
        return load_export_manifest(root)
    raise InputError(f"the {backend.value} backend runs no export; choose ort or trt")


def open_backend(backend: Backend, manifest: Manifest, root: Path, *, rank: int, device: str,
                 threads: int | None = None, extra_outputs: tuple[str, ...] = (), exact: bool = False,
                 rehash: bool = False) -> RankBackend:
    """The RankBackend of `backend` for one rank of an export (or engine) directory.

    `extra_outputs`: values inside the graphs to return as well where the backend can (ORT; used by
    `compare` to look inside a TP=1 graph). `exact`: compute quantized weights with the graph's own
    arithmetic rather than faster approximate kernels where the backend has both (ORT; used when
    checking an export against eager). `threads`: CPU threads of this rank (ORT sessions; None: the
    library's default). `rehash`: hash every engine plan, also those recorded unchanged since they were
    verified (TensorRT; an export's files are verified by the caller, `verify_rank`)."""
    if backend is Backend.ORT:
        from llama_export.backends.ort import OrtBackend

        return OrtBackend(manifest, root, rank=rank, device=device, threads=threads, extra_outputs=extra_outputs,
                          exact=exact)
    if backend is Backend.TENSORRT:
        try:
            from llama_export.backends.tensorrt.runner import TensorRTBackend
        except ImportError as e:
            raise BackendUnavailableError(f"the TensorRT backend is not available here ({e})") from None
        return TensorRTBackend(root, rank=rank, device=device, rehash=rehash)
    raise InputError(f"the {backend.value} backend runs no export; choose ort or trt")
