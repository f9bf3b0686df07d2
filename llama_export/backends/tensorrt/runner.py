"""`TensorRTBackend`: the RankBackend that runs one rank's engines (runner side of the TensorRT backend).

Per `run_segment(k, feeds)` (TensorRT 11 Python API, "IExecutionContext"):

    feeds (torch CUDA tensors, manifest names)
      └─► pick the profile whose ranges hold the shapes (decode for seq 1, else prefill)
      └─► context[profile]: set_input_shape + set_tensor_address for every input
      └─► outputs allocated from context.get_tensor_shape(name) (known once input shapes are set)
      └─► execute_async_v3(torch stream) ─► {manifest name: torch tensor}

Each `present_*` output is bound to the address of its `past_*` input (TensorRT's KV-cache-update layer
writes the cache in place and requires the shared address). Zero-length tensors are legal TensorRT
inputs ("empty tensors"); their data pointer would be null, so they are bound to a small valid scratch
buffer instead. Refit engines
keep the tensor names of the engine they were refit from; build_manifest.json maps them.
Every TensorRT name and call signature used here is checked against the TensorRT 11.4 Python package
(tests/tensorrt/conformance/check_api.py); running engines has not been done (no TensorRT GPU runtime).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llama_export import dtypes
from llama_export.artifact import schema
from llama_export.backends.tensorrt import profiles
from llama_export.backends.tensorrt.build import BUILD_MANIFEST, EXPORT_MANIFEST, BuildManifest, EngineRecord
from llama_export.backends.tensorrt.plugins import import_tensorrt, register_plugins
from llama_export.errors import ArtifactError, BackendUnavailableError, InputError
from llama_export.artifact.manifest import Manifest, resolve_inside, verify_files
from llama_export.parsing import read_bytes

if TYPE_CHECKING:  # annotations only: the API conformance check reads them (tests/tensorrt/conformance)
    import tensorrt as trt

log = logging.getLogger(__name__)


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    """torch dtype of a TensorRT dtype (TensorRT's enum members carry the numpy names, see `dtypes`)."""
    for d in dtypes.DTYPES:
        if getattr(trt, d.name, None) == dt:
            return d.torch
    raise ArtifactError(f"engine tensor dtype {dt} has no torch equivalent here")


class _Segment:
    def __init__(self, trt: Any, runtime: trt.Runtime, plan: bytes, entry: EngineRecord) -> None:
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {entry.plan} (built with another version/GPU?)")
        self.io_names: dict[str, str] = entry.io_names
        self.profiles = tuple(p.profile() for p in entry.profiles)
        self.contexts: dict[int, trt.IExecutionContext] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def device_memory_size(self) -> int:
        """The most device memory any of this engine's profiles needs for one execution context."""
        return max(self.engine.get_device_memory_size_for_profile_v2(p)
                   for p in range(self.engine.num_optimization_profiles))

    def context(self, profile: int, stream: torch.cuda.Stream, scratch: Tensor) -> trt.IExecutionContext:
        """The execution context of `profile`, made on first use on the rank's shared `scratch` memory."""
        if profile not in self.contexts:
            trt = import_tensorrt()  # imported already: the module, typed for the conformance check
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(scratch.data_ptr(), scratch.numel())
            if not ctx.set_optimization_profile_async(profile, stream.cuda_stream):
                raise ArtifactError(f"TensorRT could not select optimization profile {profile}")
            self.contexts[profile] = ctx
        return self.contexts[profile]


def load_export_manifest(build_dir: Path) -> Manifest:
    """The export manifest copied next to the engines (its ONNX files are not needed to run them)."""
    path = Path(build_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{build_dir} has no {EXPORT_MANIFEST}; point --artifacts at a `llama-export build` output")
    return Manifest.from_json(read_bytes(path, error=ArtifactError), source=str(path), fix="rebuild")


def read_plans(build_dir: Path, entries: list[EngineRecord], *, rehash: bool = False) -> list[bytes]:
    """The serialized engines of `entries`, each checked against its sha256 in the build manifest. The
    records of `artifact.verified` spare re-hashing plans unchanged since a start verified them (an 8B
    fp16 rank's plans are ~16 GB: ~13 s of hashing on every start otherwise); `rehash` hashes them all."""
    verify_files(build_dir, [(e.plan, e.plan_sha256) for e in entries], rehash=rehash,
                 fix="rebuild (`llama-export build`)")
    return [resolve_inside(build_dir, e.plan).read_bytes() for e in entries]


class TensorRTBackend:
    """Runs rank `rank`'s engines from `build_dir` (written by `build_engines`) on CUDA `device`."""

    def __init__(self, build_dir: Path, rank: int, device: torch.device | str = "cuda", *,
                 rehash: bool = False) -> None:
        self.trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"the TensorRT backend needs a CUDA device and a CUDA build of torch (device={self.device}, "
                f"cuda available={torch.cuda.is_available()})"
            )
        register_plugins()  # JIT plugin implementations, and plugin creators for deserialization
        build_dir = Path(build_dir)
        path = build_dir / BUILD_MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{build_dir} has no {BUILD_MANIFEST}; run `llama-export build` first")
        doc = BuildManifest.from_json(read_bytes(path, error=ArtifactError), source=str(path))
        entries = [e for e in doc.engines if e.rank == rank]
        if not entries:
            raise ArtifactError(f"{build_dir} has no engines for rank {rank}")
        self.rank = rank
        manifest = load_export_manifest(build_dir)
        self._in_place = schema.cache_pairs(manifest.model.n_layers)
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._segments: list[_Segment] = []
        # Everything TensorRT does happens with this rank's GPU current: runtime, engines, execution
        # contexts (made lazily in run_segment) and the JIT plugins, which launch on the current device.
        with torch.cuda.device(self.device):
            self._runtime = self.trt.Runtime(self._logger)
            self._stream = torch.cuda.Stream(device=self.device)
            self._empty = torch.empty(256, dtype=torch.uint8, device=self.device)  # address for empty tensors
            for e, plan in zip(entries, read_plans(build_dir, entries, rehash=rehash)):
                self._segments.append(_Segment(self.trt, self._runtime, plan, e))
            # One device-memory buffer for every execution context of the rank (2 per segment), as large
            # as the largest one needs: the segments run one after another on one stream, so no two
            # contexts use it at once (TensorRT-LLM shares one buffer the same way). Without it, each
            # context allocates its own.
            size = max(s.device_memory_size() for s in self._segments)
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        log.info("rank %d: loaded %d TensorRT engine(s) from %s", rank, len(self._segments), build_dir)

    def run_segment(self, index: int, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run segment `index` on CUDA tensors named as in manifest.json; returns the outputs likewise."""
        with torch.cuda.device(self.device):  # contexts and JIT plugins work on the current device
            return self._run(index, feeds)

    def _run(self, index: int, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        seg: _Segment = self._segments[index]
        engine_to_manifest = {v: k for k, v in seg.io_names.items()}
        wanted = {engine_to_manifest.get(n, n) for n in seg.inputs}
        if set(feeds) != wanted:
            raise InputError(f"segment {index} takes {sorted(wanted)}, got {sorted(feeds)}")
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        profile = profiles.choose_profile(seg.profiles, shapes)
        ctx = seg.context(profile, self._stream, self._scratch)
        keep = []
        bound: dict[str, Tensor] = {}  # manifest input name -> the tensor bound to the engine
        for name in seg.inputs:
            t = feeds[engine_to_manifest.get(name, name)]
            want = _torch_dtype(self.trt, seg.engine.get_tensor_dtype(name))
            t = torch.as_tensor(t).to(self.device, want).contiguous()  # host ids and lengths arrive as numpy
            keep.append(t)
            bound[engine_to_manifest.get(name, name)] = t
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"segment {index} input {name} of shape {tuple(t.shape)} is outside its profile")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._empty.data_ptr())
        outputs = {}
        for name in seg.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InputError(f"output {name} has unresolved shape {shape}; check the input shapes")
            cache = bound.get(self._in_place.get(engine_to_manifest.get(name, name), ""))
            if cache is not None:  # present_* is written into its past_* buffer
                ctx.set_tensor_address(name, cache.data_ptr())
                outputs[engine_to_manifest.get(name, name)] = cache
                continue
            out = torch.empty(shape, dtype=_torch_dtype(self.trt, seg.engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, out.data_ptr() if out.numel() else self._empty.data_ptr())
            outputs[engine_to_manifest.get(name, name)] = out
        # TensorRT's stream waits for everything queued on torch's so far: the inputs' producers and the
        # dtype conversions and copies above (waiting before them would let the engine read them early).
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise ArtifactError(f"TensorRT failed to run segment {index} of rank {self.rank}")
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for t in (*keep, *outputs.values()):
            t.record_stream(self._stream)
        return outputs

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Tensor:
        return torch.zeros(shape, dtype=dtypes.by_name(dtype).torch, device=self.device)

    def close(self) -> None:
        """Drop contexts and engines (frees their device memory) once the rank's stream is idle."""
        if self._segments:
            self._stream.synchronize()  # the shared scratch memory may still be in use
        for seg in self._segments:
            seg.contexts.clear()
        self._segments.clear()

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
