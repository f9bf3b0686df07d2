"""Export a checkpoint: every rank traced, named, verified, partitioned, written with a manifest.

Output: `<out>/<model_name>/<variant>/` (variant = `tp{N}-{dtype}`, `tp{N}-int4-{dtype}` with quantized
weights) holding `manifest.json`, `rank<r>/<kk>_<kind>.onnx` (the graph) with `<kk>_<kind>.onnx.data`
beside it (its weights, ONNX external data; `passes/weights.py`), and the checkpoint's text files
(tokenizer, tokenizer config, chat template, generation config; `llama_export.text.TEXT_FILES`), hashed in
the manifest. Everything is written into
a temporary sibling directory and renamed into place only when complete and verified; an existing
export is replaced whole or not at all.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch

from llama_export import __version__, dtypes
from llama_export.artifact import schema
from llama_export.artifact.segments import write_segment
from llama_export.artifact.manifest import (
    MANIFEST_NAME,
    MAX_BATCH,
    PATH_NAME,
    Collective,
    Manifest,
    RankEntry,
    Segment,
    TensorSpec,
    TextFile,
    load_manifest,
    sha256_file,
)
from llama_export.config import ModelConfig, Precision
from llama_export.errors import ArtifactError, InputError, OutputError
from llama_export.export.options import ExportOptions
from llama_export.export.passes import Pipeline
from llama_export.export.passes.check import CheckRankGraphPass
from llama_export.export.passes.cleanup import CleanupPass
from llama_export.export.passes.naming import NameGraphPass
from llama_export.export.passes.partition import partition
from llama_export.export.passes.quantize import QuantizeWeightsPass
from llama_export.export.passes.repeat import TRACED_LAYERS, NotRepeatable, RepeatLayersPass
from llama_export.export.passes.weights import AttachWeightsPass, lazy_bytes
from llama_export.export.trace import trace_rank
from llama_export.files import check_output_dir, staged_dir
from llama_export.model.checkpoint import RankWeights, load_config
from llama_export.model.layers import rope_tables
from llama_export.model.quantize import quantized_parameters
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import ExportComm, LocalComm
from llama_export.parallel.plan import RankShape, check_tp
from llama_export.progress import activity, byte_bar
from llama_export.text import load_tokenizer, text_files_in
from llama_export.text.files import TOKENIZER_FILES

log = logging.getLogger(__name__)


def segment_kinds(n_segments: int, n_layers: int) -> list[tuple[str, int | None]]:
    """(kind, layer) per segment: TP=1 is one 'full' graph; TP>1 is embed, (attention, ffn) per layer,
    head, tail."""
    if n_segments == 1:
        return [("full", None)]
    if n_segments != 2 * n_layers + 3:
        raise ArtifactError(f"partition produced {n_segments} segments, expected {2 * n_layers + 3}")
    kinds: list[tuple[str, int | None]] = [("embed", None)]
    for i in range(n_layers):
        kinds += [("attention", i), ("ffn", i)]
    return kinds + [("head", None), ("tail", None)]


def _specs(values) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=v.name, dtype=dtypes.by_onnx(int(v.dtype)).name,
                            shape=tuple(d if isinstance(d, int) else d.value for d in v.shape))
                 for v in values)


def rank_graph(cfg: ModelConfig, *, tp: int, dtype: Precision, max_batch: int, rank: int = 0,
               repeat: bool = True) -> ir.Model:
    """The weightless, cleaned, named and checked graph of one rank, traced on the meta device.

    With `repeat`, a model deeper than `TRACED_LAYERS` is traced with that many layers and the last
    one is repeated (`passes.repeat`, the same graph at a fraction of the tracing time); where the
    layers cannot be repeated, every layer is traced."""
    graph = None
    if repeat and cfg.n_layers > TRACED_LAYERS:
        graph = _trace(dataclasses.replace(cfg, n_layers=TRACED_LAYERS), tp=tp, dtype=dtype, max_batch=max_batch,
                       rank=rank)
        Pipeline(CleanupPass())(graph)
        try:
            RepeatLayersPass(cfg.n_layers)(graph)
        except NotRepeatable as e:
            log.warning("tracing all %d layers: the traced layers cannot be repeated (%s)", cfg.n_layers, e)
            graph = None
    if graph is None:
        graph = _trace(cfg, tp=tp, dtype=dtype, max_batch=max_batch, rank=rank)
        Pipeline(CleanupPass())(graph)
    Pipeline(NameGraphPass(), CheckRankGraphPass(cfg, tp))(graph)
    return graph


def _trace(cfg: ModelConfig, *, tp: int, dtype: Precision, max_batch: int, rank: int) -> ir.Model:
    comm = ExportComm(rank, tp) if tp > 1 else LocalComm()
    with torch.device("meta"):
        model = Transformer(cfg, tp=tp, rank=rank, comm=comm)
    model = model.to("meta")
    for module in model.modules():
        for key, p in module._parameters.items():
            module._parameters[key] = torch.nn.Parameter(p.to(dtype.torch_dtype), requires_grad=False)
    return trace_rank(model.eval(), max_batch=max_batch)


def export_rank(opts: ExportOptions, cfg: ModelConfig, graph: ir.Model, rank: int, root: Path, *,
                quantized: tuple[str, ...]) -> RankEntry:
    """Write rank `rank` from the traced graph (the same for every rank); returns its manifest entry.

    Every segment's weights are attached lazily (and quantized, with `opts.weights`) first; then each
    segment is written, reading one weight tensor from the checkpoint at a time, so memory holds the
    graph and one weight tensor (twice, while it is transposed), whatever the model size. `quantized`:
    the parameters `opts.weights` must quantize (the same names on every rank)."""
    cuts = partition(graph)
    kinds = segment_kinds(len(cuts), cfg.n_layers)
    cos, sin = rope_tables(cfg)
    buffers = {"rope_cos": cos, "rope_sin": sin}
    segments = []
    done: list[str] = []
    with RankWeights(opts.checkpoint, RankShape(cfg, opts.tp, rank), dtype=opts.dtype.torch_dtype) as weights:
        def fetch(name: str) -> torch.Tensor:
            return buffers[name] if name in buffers else weights.get(name)

        for cut in cuts:
            AttachWeightsPass(fetch)(cut.model)
            if opts.weights is not None:
                quantize = QuantizeWeightsPass(opts.weights, where=f" on rank {rank} at tp={opts.tp}")
                quantize(cut.model)
                done += quantize.quantized
        if sorted(done) != sorted(quantized):
            missing = sorted(set(quantized) - set(done))
            raise ArtifactError(f"rank {rank}: no MatMul/Gather reads {missing[:3]} directly, so the quantization "
                                "pass could not quantize them")
        total = sum(lazy_bytes(c.model) for c in cuts)
        with byte_bar(total, f"rank {rank + 1}/{opts.tp}: writing weights", enabled=opts.progress) as bar:
            for k, (kind, layer) in enumerate(kinds):
                cut = cuts[k]
                cuts[k] = None  # the segment's graph is freed as soon as it is on disk
                label = kind if layer is None else f"layers.{layer}.{kind}"
                rel = f"rank{rank}/{k:02d}_{label}.onnx"
                sha, data_rel, data_sha = write_segment(cut.model, root, rel, on_bytes=bar.update)
                g = cut.model.graph
                segments.append(Segment(
                    name=f"{k:02d}_{label}", file=rel, sha256=sha, kind=kind, layer=layer,
                    inputs=_specs(g.inputs), outputs=_specs(g.outputs),
                    collective=Collective(**cut.collective) if cut.collective else None,
                    data_file=data_rel, data_sha256=data_sha,
                ))
                del cut, g
    log.info("rank %d: %d segments, %.2f GiB of weights", rank, len(segments), total / 2**30)
    return RankEntry(rank=rank, segments=tuple(segments))


@dataclass(frozen=True)
class CheckedExport:
    """Options that passed `check_export`, with what checking them resolved (handed down to
    `export_into`, so that nothing is loaded or built twice)."""

    opts: ExportOptions
    cfg: ModelConfig  # the checkpoint's, with opts.max_seq_len applied
    quantized: tuple[str, ...]  # the parameters opts.weights quantizes (the same names on every rank)


def check_export(opts: ExportOptions) -> CheckedExport:
    """Everything about an export that can be checked before any work starts: the config (and TP degree)
    of the checkpoint, the names that become paths, that the target folder can be written, that the
    block size fits every rank and that the tokenizer loads."""
    cfg = load_config(opts.checkpoint, max_seq_len=opts.max_seq_len)
    check_tp(cfg, opts.tp)
    if not re.fullmatch(PATH_NAME, opts.name):
        raise InputError(f"model name {opts.name!r} cannot be a folder name; pass --name with letters, digits, "
                         "'.', '_', '+' or '-'")
    if not 1 <= opts.max_batch <= MAX_BATCH:
        raise InputError(f"max_batch={opts.max_batch} must be in 1..{MAX_BATCH}")
    check_output_dir(opts.target.parent, what="--out", shown=opts.out)
    if opts.target.exists() and not opts.target.is_dir():
        raise OutputError(f"--out: {opts.target} exists and is not a folder; move it away or choose another --out")
    quantized = _quantized_names(opts, cfg)  # a block size that does not fit every rank fails here, before tracing
    files = text_files_in(opts.checkpoint)
    if any(name in files for name in TOKENIZER_FILES):
        load_tokenizer(files, source=str(opts.checkpoint))  # the export carries them: they must load
    return CheckedExport(opts, cfg, quantized)


def _quantized_names(opts: ExportOptions, cfg: ModelConfig) -> tuple[str, ...]:
    """The parameters `opts.weights` quantizes (the same names on every rank); raises naming the weight
    and rank where the block size does not fit."""
    quantized: list[str] = []
    if opts.weights is not None:
        for rank in range(opts.tp):
            with torch.device("meta"):
                rank_model = Transformer(cfg, tp=opts.tp, rank=rank, comm=ExportComm(rank, opts.tp))
            quantized = quantized_parameters(rank_model, opts.weights)
    return tuple(quantized)


def export_into(checked: CheckedExport, root: Path) -> Manifest:
    """Write the whole export into the empty folder `root` (a staging folder) and check it as every
    consumer will; returns its manifest."""
    opts, cfg = checked.opts, checked.cfg
    if opts.dtype is Precision.BF16:
        log.warning("bf16 graphs cannot run on ONNX Runtime's CPU provider; they are meant for GPU backends")
    root = Path(root)
    # Every rank traces to the same graph (the slices are picked when weights are read), so the model is
    # traced once per export.
    traced = min(cfg.n_layers, TRACED_LAYERS)
    grown = f", repeated to {cfg.n_layers}" if cfg.n_layers > traced else ""
    with activity(f"tracing {traced} layers on the meta device{grown}", enabled=opts.progress,
                  expected_s=_trace_seconds(traced)):
        graph = rank_graph(cfg, tp=opts.tp, dtype=opts.dtype, max_batch=opts.max_batch)
    ranks = [export_rank(opts, cfg, graph, rank, root, quantized=checked.quantized) for rank in range(opts.tp)]
    text_files = []
    for fname, src in text_files_in(opts.checkpoint).items():
        shutil.copyfile(src, root / fname)
        text_files.append(TextFile(name=fname, file=fname, sha256=sha256_file(root / fname)))
    manifest = Manifest(
        model_name=opts.name, variant=opts.variant, model=cfg, tp=opts.tp, dtype=opts.dtype, opset=schema.OPSET,
        ir_version=schema.IR_VERSION, max_batch=opts.max_batch, ranks=tuple(ranks),
        inputs=schema.graph_inputs(cfg.n_layers), outputs=schema.graph_outputs(cfg.n_layers),
        exporter_version=__version__,
        custom_nodes={"domain": schema.DOMAIN, "version": schema.VERSION,
                      "ops": [*schema.COMPUTE_OPS, *schema.COLLECTIVE_OPS]},
        text_files=tuple(text_files), weight_quant=opts.weights, quantized_weights=checked.quantized,
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    # The written directory must pass the checks every consumer runs; its hashes were computed while
    # writing, so the files are not read back.
    return load_manifest(root, verify_hashes=False)


def export(opts: ExportOptions) -> Path:
    """Export into `opts.target`, replacing an earlier export there only when this one is complete
    (no numerical validation: `job.run_job` validates before the swap)."""
    checked = check_export(opts)
    with staged_dir(opts.target) as tmp:
        export_into(checked, tmp)
    return opts.target


def _trace_seconds(n_layers: int) -> float:
    """Rough tracing time on 2 busy CPU cores (measured: 8 s at 2 layers, 38 s at 32, 100 s at 80)."""
    return 7.0 + 0.9 * n_layers + 0.004 * n_layers**2
