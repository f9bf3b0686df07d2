"""ONNX Runtime backend: one InferenceSession per segment of one rank.

Sessions are created from the segment's ONNX Runtime lowering. An export written by `llama-export
export` carries it (`prelower.py`: `rank<r>/<segment>.ort.onnx`, listed in the manifest), so the session
is created from that file: ONNX Runtime reads the weights itself, once, into its own buffers, and this
process imports neither onnx_ir nor torch. That file fuses attention for onnxruntime >= 1.32; on 1.31
(the newest onnxruntime-gpu) every segment is lowered in memory without that fusion (`runtime.py`). Otherwise (exports written by the library's `export()`, the
exact arithmetic `compare` asks for on quantized weights, or values exposed from inside a graph) the
canonical graph is lowered in memory (`lowering.lower_segment`) without its weights: the lowered proto
only refers to the segment's data file, which ONNX Runtime reads from the segment's folder
(`session.model_external_initializers_file_folder_path`), and weights the lowering repacked are handed
over as OrtValues (measured: 1.02x the weight bytes after loading, against 2.4x when the session is
built from a serialized in-memory copy).

Every run binds inputs and outputs to the arrays' memory (IOBinding): no per-step copies, and each
`present_*` output is bound to the buffer of its `past_*` input, so the KV cache is written in place
(GroupQueryAttention detects the shared buffer). On the CPU the arrays are numpy's and torch is never
imported; on CUDA (onnxruntime-gpu) they are torch tensors on the device. onnxruntime is imported
lazily, so that importing llama_export never needs it.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

from typing import TYPE_CHECKING, Any

import numpy as np

from llama_export import dtypes
from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest, resolve_inside
from llama_export.backends.ort import runtime
from llama_export.config import Precision
from llama_export.errors import ArtifactError, BackendUnavailableError

if TYPE_CHECKING:
    import onnx_ir as ir

log = logging.getLogger(__name__)


def import_onnxruntime() -> Any:
    """`import onnxruntime` (either distribution installs it), or BackendUnavailableError (one line)
    saying what to install, or that it is too old."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "neither onnxruntime nor onnxruntime-gpu is installed: pip install -e '.[cpu]' (CPU), or "
            "'.[gpu]' beside a CUDA torch") from None
    runtime.check_version(onnxruntime)
    return onnxruntime


def session_providers(ort: Any, device: str) -> list:
    """The execution providers a session on `device` ("cpu", "cuda", "cuda:N") asks for, in order;
    BackendUnavailableError (one line) for CUDA on an onnxruntime without its CUDA provider."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            "--device cuda with the ort backend needs onnxruntime-gpu (pip install -e '.[gpu]'); "
            "this onnxruntime has only " + ", ".join(ort.get_available_providers()))
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def check_providers_used(session: Any, asked: list) -> None:
    """BackendUnavailableError (one line) when `session` dropped the first provider it was asked for:
    ONNX Runtime falls back to the CPU, with only a warning on its own log, when the CUDA provider's
    libraries (CUDA, cuDNN) do not load."""
    want = asked[0][0] if isinstance(asked[0], tuple) else asked[0]
    used = session.get_providers()
    if want not in used:
        raise BackendUnavailableError(
            f"onnxruntime could not use {want} (the session runs on {', '.join(used)}): its CUDA or cuDNN "
            "libraries did not load; `llama-export doctor` shows what is installed")


class OrtBackend:
    """RankBackend over ONNX Runtime sessions (CPU execution provider; CUDA where onnxruntime-gpu is)."""

    def __init__(self, manifest: Manifest, root: Path, *, rank: int, device: str = "cpu",
                 threads: int | None = None, extra_outputs: tuple[str, ...] = (), exact: bool = False) -> None:
        """`exact`: run quantized weights with the canonical graph's arithmetic (fp32 compute,
        `EXACT_ACCURACY_LEVEL`) instead of the fast int8-activation kernels (see `weight_only.py`).
        `threads`: intra-op threads of each session (None: ONNX Runtime's default, the machine's cores).
        `extra_outputs`: values inside the graphs to return as well, where a segment has them."""
        ort = import_onnxruntime()
        self.device = str(device)
        kind, _, index = self.device.partition(":")
        self._kind, self._index = kind, int(index or 0)
        providers = session_providers(ort, self.device)
        if kind == "cuda":
            if manifest.dtype is Precision.FP32:
                log.warning("onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 only: this fp32 export's "
                            "attention runs on the CPU provider (a copy each way per layer); export fp16 or bf16 "
                            "for CUDA")
        elif manifest.dtype is Precision.BF16:
            raise BackendUnavailableError("ONNX Runtime's CPU provider has no bf16 kernels; export fp32 or fp16")
        self.sessions = []
        self.output_names: list[list[str]] = []
        self.in_place = schema.cache_pairs(manifest.model.n_layers)
        self.segments = manifest.rank(rank).segments
        # The written lowering runs at the default accuracy level; it is the same graph as the in-memory
        # one unless quantized weights must be computed exactly.
        prelowered = not extra_outputs and not (exact and manifest.weight_quant is not None)
        # The written lowering fuses attention for onnxruntime >= 1.32; an older runtime lowers in memory
        # without that fusion (`runtime.py`).
        fuse = runtime.fused_attention(ort)
        if not fuse:
            log.info("onnxruntime %s has no GroupQueryAttention query_seqlens (1.32+): attention runs unfused "
                     "(TensorScatter + Attention), lowered in memory", ort.__version__)
        self.prelowered = fuse and prelowered and all(seg.ort is not None for seg in self.segments)
        for seg in self.segments:
            opts = _session_options(ort, threads)
            names = [o.name for o in seg.outputs]
            if self.prelowered:
                session = _open(ort, root, seg.ort.file, opts, providers)
            else:
                session, more = _lowered_in_memory(ort, resolve_inside(root, seg.file), opts, providers,
                                                   exact=exact, extra_outputs=extra_outputs, fuse_attention=fuse)
                names += more
            check_providers_used(session, providers)
            self.sessions.append(session)
            self.output_names.append(names)
        # The outputs this backend allocates (not written into a past_* buffer), by segment.
        self._out_specs = [{o.name: o for o in seg.outputs if o.name not in self.in_place} for seg in self.segments]
        # One IOBinding per session, kept across steps: a decode step rebinds only what moved (the ids and
        # lengths), not the KV cache's 2 x n_layers buffers, which stay where they are for a whole run.
        self._bindings = [(s.io_binding(), {}) for s in self.sessions]
        log.info("rank %d: %d ONNX Runtime sessions on %s (%s)", rank, len(self.sessions), providers[0],
                 "written lowering" if self.prelowered else "lowered in memory")

    def run_segment(self, index: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run segment `index`; present_* outputs are written into their past_* feeds and returned as them."""
        session = self.sessions[index]
        io, bound = self._bindings[index]
        feeds = {name: self._own(x) for name, x in feeds.items()}
        for name, x in feeds.items():
            if _rebind(bound, name, x):
                io.bind_input(name, self._kind, self._index, *_buffer(x))
        out: dict[str, Any] = {}
        names = self.output_names[index]
        dims = _dims(self.segments[index].inputs, feeds)
        fetch = False
        for name in names:
            buffer = feeds.get(self.in_place.get(name, ""))
            if buffer is not None:
                if _rebind(bound, (name, "out"), buffer):
                    io.bind_output(name, self._kind, self._index, *_buffer(buffer))
                out[name] = buffer
            elif (spec := self._out_specs[index].get(name)) is not None and \
                    None not in (shape := [dims.get(d) if isinstance(d, str) else d for d in spec.shape]):
                # a new array of this run's shape, written by ONNX Runtime (no copy out of its buffer)
                out[name] = self._empty(tuple(shape), spec.dtype)
                io.bind_output(name, self._kind, self._index, *_buffer(out[name]))
            else:  # allocated by ONNX Runtime, afresh each run (a kept one would have the last run's shape)
                io.bind_output(name, self._kind, self._index)  # on this rank's device (the default is 0)
                fetch = True
        if self._kind == "cuda":
            # ONNX Runtime runs on its own CUDA stream: the inputs (collective outputs, caches from
            # torch.zeros) must be complete on torch's stream first; its outputs are complete when the
            # outputs are synchronized, before torch reads them.
            import torch

            torch.cuda.current_stream(self.device).synchronize()
            session.run_with_iobinding(io)
            io.synchronize_outputs()
        else:
            session.run_with_iobinding(io)
        if fetch:
            for name, value in zip(names, io.get_outputs()):
                if name not in out:
                    # `numpy()` views ONNX Runtime's buffer without keeping it alive: copy before the binding goes.
                    out[name] = self._own(value.numpy().copy())
        return out

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._empty(shape, dtype, zeroed=True)

    def _empty(self, shape: tuple[int, ...], dtype: str, *, zeroed: bool = False) -> Any:
        if self._kind == "cpu":
            return (np.zeros if zeroed else np.empty)(shape, dtype=dtype)
        import torch

        return (torch.zeros if zeroed else torch.empty)(shape, dtype=dtypes.by_name(dtype).torch, device=self.device)

    def _own(self, x: Any) -> Any:
        """`x` as this backend's array: a contiguous numpy array on the CPU, a torch tensor on CUDA."""
        if self._kind == "cpu":
            return np.ascontiguousarray(x)
        import torch

        return torch.as_tensor(x, device=self.device).contiguous()

    def close(self) -> None:
        self._bindings.clear()
        self.sessions.clear()

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(ort, root: Path, rel: str, opts, providers):
    """A session on the written lowering `rel`; a file ONNX Runtime cannot load is one ArtifactError."""
    try:
        return ort.InferenceSession(str(resolve_inside(root, rel)), sess_options=opts, providers=providers)
    except (MemoryError, OSError):
        raise  # the CLI's own lines for these
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / InvalidProtobuf (plain Exception subclasses)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ArtifactError(f"{rel} cannot be opened by onnxruntime {ort.__version__} ({first[:160]}); "
                            "re-export") from None


def _lowered_in_memory(ort, path: Path, opts, providers, *, exact: bool, extra_outputs: tuple[str, ...],
                       fuse_attention: bool = True):
    """(session, exposed extra output names) of the canonical segment at `path`, lowered in memory."""
    import onnx_ir as ir

    from llama_export.backends.ort.lowering import lower_segment
    from llama_export.backends.ort.weight_only import DEFAULT_ACCURACY_LEVEL, EXACT_ACCURACY_LEVEL

    lowered = lower_segment(path, EXACT_ACCURACY_LEVEL if exact else DEFAULT_ACCURACY_LEVEL,
                            fuse_attention=fuse_attention)
    more = _expose(lowered, extra_outputs)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    held = _hand_over_in_memory_weights(lowered)
    if held:
        opts.add_external_initializers(list(held), [ort.OrtValue.ortvalue_from_numpy(a) for a in held.values()])
    session = ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), sess_options=opts, providers=providers)
    return session, more  # ONNX Runtime copied the handed-over weights while creating the session


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


def _hand_over_in_memory_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """The lowering's in-memory initializers (e.g. `MatMulNBits`' repacked weights), taken out of `model`
    for `SessionOptions.add_external_initializers`: each becomes an external-data reference ONNX Runtime
    replaces with the array (it copies it) before it reads anything. The serialized graph then stays
    small: a model proto cannot exceed 2 GB (an 8B model's int4 weights at TP=1 are ~4.4 GB), and the
    weights are not copied once more into the serialized bytes. Weights already in external files stay
    references ONNX Runtime reads itself; small constants (under `schema.INLINE_BYTES`, e.g. shapes) stay
    inline, as in exports."""
    import onnx_ir as ir

    held = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or isinstance(t, ir.ExternalTensor) or t.dtype.bitwidth < 8 or t.nbytes < schema.INLINE_BYTES:
            continue
        held[name] = np.ascontiguousarray(t.numpy())
        v.const_value = ir.ExternalTensor(_HANDED_OVER, 0, t.nbytes, t.dtype, shape=t.shape, name=name)
    return held


_HANDED_OVER = "handed-over-in-memory"  # a location no file has: ONNX Runtime replaces these before reading


def _session_options(ort, threads: int | None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:  # the rank decided its thread count (runner.threads.rank_threads)
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Weights are repacked for the kernels (MLAS) on the session's threads instead of one by one: 0.46 ->
    # 0.30 s for 512 MiB of fp32 weights on 2 cores. The same anonymous memory (the packed copies); the
    # originals' file pages stay mapped until all are packed (clean page cache the kernel can reclaim, but
    # counted in the process's peak RSS until then).
    opts.add_session_config_entry("session.prepack.enable_parallel", "1")
    return opts


def _dims(inputs, feeds: dict[str, Any]) -> dict[str, int]:
    """The sizes this run gives the symbolic dimensions ("batch", "seq", ...) of a segment's inputs."""
    dims: dict[str, int] = {}
    for spec in inputs:
        for d, n in zip(spec.shape, feeds[spec.name].shape):
            if isinstance(d, str):
                dims[d] = int(n)
    return dims


def _rebind(bound: dict, key: Any, x: Any) -> bool:
    """Whether `x` must be bound under `key`: it is not the array bound there last time (the same live
    object still has the same memory; a weak reference, so that a finished run's cache is not kept)."""
    last = bound.get(key)
    if last is not None and last() is x:
        return False
    bound[key] = weakref.ref(x)
    return True


def _buffer(x: Any) -> tuple[type | int, list[int], int]:
    """(element type, shape, address) of a numpy array or a torch tensor, for IOBinding. A torch tensor's
    element type is the ONNX one (an int, which IOBinding also takes): numpy has no bfloat16."""
    if isinstance(x, np.ndarray):
        return x.dtype.type, list(x.shape), x.ctypes.data
    return dtypes.by_torch(x.dtype).onnx, list(x.shape), x.data_ptr()
