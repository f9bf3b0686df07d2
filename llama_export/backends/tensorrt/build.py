"""Build per-rank TensorRT engines from an export directory (loader side of the TensorRT backend).

    artifacts/manifest.json ──► per rank, per segment:
        lower (lowering.py) ──► structure key (structure.py)
            first of its key ──► build: strongly typed network, prefill + decode profiles,
                                 shared timing cache, REFIT flag           ──► rank<r>/<segment>.plan
            same key again   ──► rename its ONNX into the first one's names, refit the first
                                 engine with these weights, serialize       ──► rank<r>/<segment>.plan
    out/build_manifest.json: TensorRT version, GPU, profiles, sha256 of every input ONNX and plan,
                             refit sources and engine I/O names per segment.

Everything is written to a staged directory beside `out_dir` and swapped into place when complete.
TensorRT 11 API used (Python API docs, "Builder", "IBuilderConfig", "OnnxParser", "Refitter",
"ITimingCache"): networks are always strongly typed there (the STRONGLY_TYPED flag is accepted and
ignored), precision comes from the ONNX. Every TensorRT name, enum member and call signature used here
is checked against the TensorRT 11.4 Python package (tests/tensorrt/conformance/check_api.py), and the
plugin-preference flags drive the parser-side plugin creation there. Not run anywhere yet: a real
parse, build or refit (refit of engines with plugin layers included); that needs libnvinfer and a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import onnx
from pydantic import Field

from llama_export.backends.tensorrt import lowering, profiles, structure
from llama_export.backends.tensorrt.plugins import import_tensorrt, register_plugins
from llama_export.config import ContextLength, Precision, TPDegree
from llama_export.errors import ArtifactError, BackendUnavailableError, ConfigError
from llama_export.export.sizing import EngineMemory, check_engine_fits
from llama_export.files import staged_dir
from llama_export.parsing import parse_json
from llama_export.artifact.manifest import (
    Manifest,
    Segment,
    Sha256,
    load_manifest,
    resolve_inside,
    sha256_file,
)

if TYPE_CHECKING:  # annotations only: the API conformance check reads them (tests/tensorrt/conformance)
    import tensorrt as trt

log = logging.getLogger(__name__)

BUILD_MANIFEST = "build_manifest.json"
BUILD_FORMAT = "llama_export.trt_build"
BUILD_FORMAT_VERSION = 1
TIMING_CACHE = "timing.cache"
# The export's manifest travels with the engines: the runner reads segment I/O and collectives from it.
EXPORT_MANIFEST = "export_manifest.json"


# ---- build_manifest.json: written by `build_engines`, read by the runner, one schema ------------------

Dims = tuple[Annotated[int, Field(ge=0)], ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Dims
    opt: Dims
    max: Dims


@dataclass(frozen=True)
class ProfileRecord:
    """One optimization profile of an engine: (min, opt, max) shape per input (manifest names)."""

    name: str
    shapes: dict[str, ShapeRange]

    @classmethod
    def of(cls, p: profiles.Profile) -> ProfileRecord:
        return cls(p.name, {k: ShapeRange(*v) for k, v in p.shapes.items()})

    def profile(self) -> profiles.Profile:
        return profiles.Profile(self.name, {k: (v.min, v.opt, v.max) for k, v in self.shapes.items()})


@dataclass(frozen=True)
class EngineRecord:
    """One segment's engine, as build_manifest.json lists it."""

    rank: Annotated[int, Field(ge=0)]
    segment: str
    onnx_sha256: Sha256  # the exported segment, as in manifest.json
    plan: str  # relative path (`resolve_inside` checks it)
    plan_sha256: Sha256
    structure_key: str
    refit_from: str | None  # "rank<r>/<segment>" whose engine was refit, or None if built
    io_names: dict[str, str]  # manifest tensor name -> engine tensor name
    profiles: tuple[ProfileRecord, ...]


@dataclass(frozen=True)
class GpuRecord:
    name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class BuildManifest:
    """build_manifest.json: TensorRT version, GPU, profiles, sha256 of every input ONNX and plan, refit
    sources and engine I/O names per segment."""

    format: str
    format_version: int
    model_name: str
    variant: str
    tp: TPDegree
    dtype: Precision
    tensorrt_version: str
    gpu: GpuRecord
    plugins: Literal["aot", "jit"]
    profile_names: tuple[str, ...]
    max_batch: Annotated[int, Field(ge=1)]
    max_seq_len: ContextLength
    engines_built: Annotated[int, Field(ge=0)]
    engines_refit: Annotated[int, Field(ge=0)]
    engines: tuple[EngineRecord, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)  # Precision is a str enum: its value

    @classmethod
    def from_json(cls, raw: bytes | str, *, source: str, fix: str = "rebuild") -> BuildManifest:
        """Parse build_manifest.json strictly; errors name `source`."""
        header = parse_json(raw, _Header, source=source, fix=fix, error=ArtifactError)
        if header.format != BUILD_FORMAT or header.format_version != BUILD_FORMAT_VERSION:
            raise ArtifactError(f"{source} is not a llama_export TensorRT build manifest of format version "
                                f"{BUILD_FORMAT_VERSION} (format={header.format!r}, "
                                f"format_version={header.format_version!r}); {fix}")
        return parse_json(raw, cls, source=source, fix=fix, error=ArtifactError)


@dataclass(frozen=True)
class _Header:
    format: Any = None
    format_version: Any = None


def assemble_build_manifest(
    manifest: Manifest,
    records: Sequence[EngineRecord],
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    plugins: Literal["aot", "jit"],
    max_batch: int | None = None,
    max_seq_len: int | None = None,
) -> BuildManifest:
    """The build_manifest.json content (pure: no TensorRT, no files)."""
    builds = sum(r.refit_from is None for r in records)
    return BuildManifest(
        format=BUILD_FORMAT,
        format_version=BUILD_FORMAT_VERSION,
        model_name=manifest.model_name,
        variant=manifest.variant,
        tp=manifest.tp,
        dtype=manifest.dtype,
        tensorrt_version=tensorrt_version,
        gpu=GpuRecord(gpu_name, f"{compute_capability[0]}.{compute_capability[1]}"),
        plugins=plugins,
        profile_names=tuple(profiles.PROFILE_NAMES),
        max_batch=manifest.max_batch if max_batch is None else max_batch,
        max_seq_len=manifest.model.max_seq_len if max_seq_len is None else max_seq_len,
        engines_built=builds,
        engines_refit=len(records) - builds,
        engines=tuple(records),
    )


def engines_manifest(manifest: Manifest, max_batch: int, max_seq_len: int) -> Manifest:
    """The export manifest that goes beside the engines: the export's, with the engines' batch and
    context limits (their cache capacity), so that a run allocates caches of the engines' static
    length and refuses what they cannot take."""
    model = dataclasses.replace(manifest.model, max_seq_len=max_seq_len)
    return dataclasses.replace(manifest, model=model, max_batch=max_batch)


def default_out_dir(manifest: Manifest, root: Path = Path("engines")) -> Path:
    """engines/<model_name>/<variant>, next to graphs/<model_name>/<variant>."""
    return root / manifest.model_name / manifest.variant


def network_flags(trt: Any, *, aot_plugins: bool) -> int:
    """Strongly typed (always on in TensorRT 11), and which plugin implementation the parser asks for."""
    F = trt.NetworkDefinitionCreationFlag
    prefer = F.PREFER_AOT_PYTHON_PLUGINS if aot_plugins else F.PREFER_JIT_PYTHON_PLUGINS
    return 1 << int(F.STRONGLY_TYPED) | 1 << int(prefer)


def parse_onnx(trt: Any, builder: trt.Builder, logger: trt.ILogger, onnx_path: Path, *,
               aot_plugins: bool) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """A lowered segment parsed into a new network (the parser must outlive the network's use)."""
    network = builder.create_network(network_flags(trt, aot_plugins=aot_plugins))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
    return network, parser


def polygraphy_network(onnx_path: str, *, aot_plugins: bool = True) -> Callable[[], tuple[Any, Any, Any]]:
    """`load_network` for a Polygraphy network script: (builder, network, parser) of a lowered segment,
    parsed with the llama_export plugins registered (see validate/polygraphy_data.py)."""

    def load_network() -> tuple[Any, Any, Any]:
        trt = import_tensorrt()
        register_plugins()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, parser = parse_onnx(trt, builder, logger, Path(onnx_path), aot_plugins=aot_plugins)
        return builder, network, parser

    return load_network


class _Builder:
    """Holds the TensorRT builder, logger and the timing cache shared by every segment."""

    def __init__(self, trt: Any, cache_path: Path | None, *, aot_plugins: bool, workspace_gib: float) -> None:
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.aot_plugins = aot_plugins
        self.workspace = int(workspace_gib * (1 << 30))
        config = self.builder.create_builder_config()
        blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
        self.timing_cache = config.create_timing_cache(blob)
        self.cache_origin = cache_path if blob else None  # where a loaded cache came from

    def attach_timing_cache(self, config: trt.IBuilderConfig) -> None:
        """Give `config` the shared timing cache; a loaded cache TensorRT rejects is replaced by a new one.

        TensorRT refuses a cache made on another GPU or by another TensorRT version
        (`set_timing_cache` returns False); the rejected cache is then neither used nor written back.
        """
        if config.set_timing_cache(self.timing_cache, ignore_mismatch=False):
            return
        if self.cache_origin is None:
            raise ArtifactError("TensorRT rejected a new, empty timing cache")
        log.warning("TensorRT rejected the timing cache %s (another GPU or TensorRT version?); starting a new one",
                    self.cache_origin)
        self.timing_cache, self.cache_origin = config.create_timing_cache(b""), None
        if not config.set_timing_cache(self.timing_cache, ignore_mismatch=False):
            raise ArtifactError("TensorRT rejected a new, empty timing cache")

    def build(self, onnx_path: Path, profs: Sequence[profiles.Profile]) -> bytes:
        trt = self.trt
        network, _parser = parse_onnx(trt, self.builder, self.logger, onnx_path, aot_plugins=self.aot_plugins)
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        config.set_flag(trt.BuilderFlag.REFIT)
        self.attach_timing_cache(config)
        for p in profs:
            op = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in p.shapes.items():
                op.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(op)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise ArtifactError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
        return bytes(plan)

    def refit(self, base_plan: bytes, renamed_onnx: Path) -> bytes:
        trt = self.trt
        runtime = trt.Runtime(self.logger)  # kept referenced while the engine is in use
        engine = runtime.deserialize_cuda_engine(base_plan)
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(renamed_onnx)) or not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise ArtifactError(f"refitting from {renamed_onnx.name} failed; missing weights: {missing[:5]}")
        return bytes(engine.serialize())

    def serialized_cache(self) -> bytes:
        return bytes(self.timing_cache.serialize())


def _gpu() -> tuple[str, tuple[int, int], int]:
    """(name, compute capability, total memory in bytes) of the current GPU."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("building TensorRT engines needs a CUDA GPU and a CUDA build of torch")
    return (torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


@dataclass(frozen=True)
class BuildOptions:
    """How `llama-export build` builds engines (the CLI's defaults come from here)."""

    ranks: tuple[int, ...] | None = None  # None: every rank
    refit: bool = True  # build one engine per layer kind and refit it for the other layers
    aot_plugins: bool = True  # AOT PTX plugins; False: the plugins' Python (JIT) implementation
    workspace_gib: float = 4.0
    timing_cache: Path | None = None  # default: out_dir/timing.cache of a previous build
    max_batch: int | None = None  # rows of the profiles; None: the export's max_batch (at most that)
    max_seq_len: int | None = None  # KV cache slots per row and longest prefill; None: the model's (at most)
    gpu_memory: int | None = None  # bytes one rank may use; None: the GPU's memory


def engine_limits(manifest: Manifest, options: BuildOptions) -> tuple[int, int]:
    """(max_batch, max_seq_len) of the engines: the options', which may not exceed the export's."""
    max_batch = manifest.max_batch if options.max_batch is None else options.max_batch
    max_seq_len = manifest.model.max_seq_len if options.max_seq_len is None else options.max_seq_len
    if max_batch > manifest.max_batch:
        raise ConfigError(f"--max-batch {max_batch} is larger than the export's max_batch {manifest.max_batch}; "
                          f"use --max-batch {manifest.max_batch} or less, or re-export with a larger --max-batch")
    if max_seq_len > manifest.model.max_seq_len:
        raise ConfigError(f"--max-seq-len {max_seq_len} is longer than the model's max_seq_len "
                          f"{manifest.model.max_seq_len}; use --max-seq-len {manifest.model.max_seq_len} or less")
    return max_batch, max_seq_len


def rank_weight_bytes(manifest: Manifest, artifacts_dir: Path, rank: int) -> int:
    """Bytes of one rank's graphs on disk (each segment's .onnx and its external data)."""
    total = 0
    for seg in manifest.rank(rank).segments:
        path = resolve_inside(artifacts_dir, seg.file)
        total += sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())
    return total


def check_memory(manifest: Manifest, artifacts_dir: Path, options: BuildOptions, *, limit: int,
                 limit_name: str) -> tuple[EngineMemory, EngineMemory]:
    """Each rank's (prefill, decode) GPU memory estimate (`export.sizing.engine_memory`), or ConfigError
    (one line naming --max-batch / --max-seq-len) when a rank to build needs more than `limit` bytes."""
    max_batch, max_seq_len = engine_limits(manifest, options)
    ranks = range(manifest.tp) if options.ranks is None else options.ranks
    weights = max(rank_weight_bytes(manifest, artifacts_dir, r) for r in ranks)
    return check_engine_fits(manifest.model, tp=manifest.tp, dtype=manifest.dtype, weight_bytes=weights,
                             max_batch=max_batch, capacity=max_seq_len, limit=limit, limit_name=limit_name)


def check_weight_quant(manifest: Manifest) -> None:
    """Raise ArtifactError for weights TensorRT cannot build: its (de)quantize layers take zero points
    that are all 0 only ("only symmetric quantization is supported", IQuantizeLayer / IDequantizeLayer in
    the TensorRT 10-11 API), so an asymmetric int4 export (uint4 weights, a zero point per block) has no
    TensorRT form; the export must be made symmetric."""
    wq = manifest.weight_quant
    if wq is not None and not wq.symmetric:
        raise ArtifactError(
            f"{manifest.variant} holds asymmetric int{wq.bits} weights (a zero point per block), which TensorRT "
            f"cannot build (its dequantize takes zero points of 0 only); re-export with --symmetric for TensorRT")


def build_engines(artifacts_dir: Path, out_dir: Path, options: BuildOptions = BuildOptions()) -> Path:
    """Build engines for `options.ranks` of the export in `artifacts_dir` into `out_dir`; returns it.

    The updated timing cache is written with the engines. The engine directory is staged and swapped
    into place whole (`files.staged_dir`)."""
    artifacts_dir, out_dir = Path(artifacts_dir), Path(out_dir)
    manifest = load_manifest(artifacts_dir)
    check_weight_quant(manifest)  # before TensorRT is needed: the export itself is the problem
    ranks = list(range(manifest.tp)) if options.ranks is None else list(options.ranks)
    for r in ranks:
        manifest.rank(r)  # validates
    max_batch, max_seq_len = engine_limits(manifest, options)
    if options.gpu_memory is not None:  # refused before TensorRT is even imported
        check_memory(manifest, artifacts_dir, options, limit=options.gpu_memory, limit_name="--gpu-memory")
    trt = import_tensorrt()
    register_plugins()
    gpu_name, cc, gpu_bytes = _gpu()
    if options.gpu_memory is None:
        for m in check_memory(manifest, artifacts_dir, options, limit=gpu_bytes,
                              limit_name=f"the memory of {gpu_name}"):
            log.info("rank memory, estimated: %s", m.describe())
    with staged_dir(out_dir) as tmp:
        builder = _Builder(trt, options.timing_cache or out_dir / TIMING_CACHE, aot_plugins=options.aot_plugins,
                           workspace_gib=options.workspace_gib)
        records: list[EngineRecord] = []
        first: dict[str, tuple[str, onnx.ModelProto, bytes]] = {}  # key -> (id, lowered model, plan)
        total = sum(len(manifest.rank(r).segments) for r in ranks)
        for r in ranks:
            (tmp / f"rank{r}").mkdir()
            for seg in manifest.rank(r).segments:
                rec = _one_segment(builder, manifest, artifacts_dir, tmp, r, seg, first, refit=options.refit,
                                   max_batch=max_batch, max_seq_len=max_seq_len)
                records.append(rec)
                log.info("[%d/%d] rank %d %s: %s", len(records), total, r, seg.name,
                         f"refit from {rec.refit_from}" if rec.refit_from else "built")
        (tmp / TIMING_CACHE).write_bytes(builder.serialized_cache())
        doc = assemble_build_manifest(
            manifest, records, tensorrt_version=trt.__version__, gpu_name=gpu_name,
            compute_capability=cc, plugins="aot" if options.aot_plugins else "jit",
            max_batch=max_batch, max_seq_len=max_seq_len,
        )
        (tmp / BUILD_MANIFEST).write_text(doc.to_json(), encoding="utf-8")
        (tmp / EXPORT_MANIFEST).write_text(engines_manifest(manifest, max_batch, max_seq_len).to_json(),
                                           encoding="utf-8")
        for t in manifest.text_files:  # at the same relative paths, so the copied manifest describes them
            shutil.copyfile(resolve_inside(artifacts_dir, t.file), tmp / t.file)
        for f in tmp.rglob("*.trt.onnx*"):
            f.unlink()  # lowered graphs were inputs to the builder only
    return out_dir


def _one_segment(
    builder: _Builder,
    manifest: Manifest,
    artifacts_dir: Path,
    tmp: Path,
    rank: int,
    seg: Segment,
    first: dict[str, tuple[str, onnx.ModelProto, bytes]],
    *,
    refit: bool,
    max_batch: int,
    max_seq_len: int,
) -> EngineRecord:
    src = resolve_inside(artifacts_dir, seg.file)
    lowered_path = tmp / f"rank{rank}" / f"{seg.name}.trt.onnx"
    lowering.lower_file(src, lowered_path)
    lowered = onnx.load(str(lowered_path))
    key = structure.structure_key(lowered)
    seg_id = f"rank{rank}/{seg.name}"
    profs = profiles.plan_profiles(seg.inputs, max_batch=max_batch, max_seq_len=max_seq_len)
    io_names = {t.name: t.name for t in (*seg.inputs, *seg.outputs)}
    refit_from = None
    if refit and key in first:
        refit_from, reference, base_plan = first[key]
        renamed_path = tmp / f"rank{rank}" / f"{seg.name}.refit.trt.onnx"
        onnx.save(structure.rename_like(lowered, reference), str(renamed_path))
        plan = builder.refit(base_plan, renamed_path)
        io_names = structure.io_name_map(lowered, reference)
    else:
        # Profiles use the segment's own names; an engine refit later keeps this engine's names.
        plan = builder.build(lowered_path, profs)
        first.setdefault(key, (seg_id, lowered, plan))
    plan_rel = f"rank{rank}/{seg.name}.plan"
    (tmp / plan_rel).write_bytes(plan)
    rec = EngineRecord(
        rank=rank, segment=seg.name, onnx_sha256=seg.sha256, plan=plan_rel, plan_sha256=sha256_file(tmp / plan_rel),
        structure_key=key, refit_from=refit_from, io_names=io_names,
        profiles=tuple(ProfileRecord.of(p) for p in profs),
    )
    return rec
