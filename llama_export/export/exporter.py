"""Export a checkpoint: every rank traced, named, verified, partitioned, written with a manifest.

Output: `<out>/<model_name>/<variant>/` (variant = `tp{N}-{dtype}`) holding `manifest.json`,
`rank<r>/<kk>_<kind>.onnx` and `tokenizer.model` when the checkpoint has one. Everything is written into
a temporary sibling directory and renamed into place only when complete and verified; an existing
export is replaced whole or not at all.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from llama_export import __version__
from llama_export.config import Precision
from llama_export.errors import ArtifactError
from llama_export.export import schema
from llama_export.export.manifest import (
    MANIFEST_NAME,
    Collective,
    Manifest,
    RankEntry,
    Segment,
    TensorSpec,
    load_manifest,
    sha256_file,
)
from llama_export.export.passes.naming import name_graph
from llama_export.export.passes.partition import Cut, partition
from llama_export.export.passes.verify import check, check_rank_graph
from llama_export.export.passes.weights import attach_weights
from llama_export.export.trace import IR_VERSION, OPSET, trace_rank
from llama_export.model.checkpoint import RankWeights, load_config
from llama_export.model.layers import precompute_freqs_cis
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import ExportComm, LocalComm
from llama_export.parallel.plan import check_tp

log = logging.getLogger(__name__)

_TWO_GB = 2**31 - 1
_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
}


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    out: Path = Path("graphs")
    tp: int = 1
    dtype: Precision = Precision.FP32
    model_name: str | None = None  # default: the checkpoint folder's name
    max_batch: int = 8
    max_seq_len: int | None = None  # default: the checkpoint's
    progress: bool = True

    @property
    def variant(self) -> str:
        return f"tp{self.tp}-{self.dtype.value}"


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


def _specs(model: onnx.ModelProto, values) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        out.append(TensorSpec(name=v.name, dtype=_DTYPE_NAMES.get(tt.elem_type, str(tt.elem_type)), shape=shape))
    return tuple(out)


# Serialized graphs above this go to external data (protobuf cannot hold 2 GB; keep a margin).
EXTERNAL_DATA_THRESHOLD = _TWO_GB - (64 << 20)


def _write_segment(cut: Cut, root: Path, rel: str) -> str | None:
    """Write (and check) one segment; returns the relative path of its external data file, if any."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if cut.model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        data_rel = rel + ".data"
        onnx.save_model(cut.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(data_rel).name, size_threshold=1024)
        check(path)
        return data_rel if (root / data_rel).is_file() else None  # no tensor above size_threshold
    check(cut.model)
    onnx.save_model(cut.model, str(path))
    return None


def export_rank(opts: ExportOptions, rank: int, root: Path) -> RankEntry:
    """Trace and write rank `rank`; returns its manifest entry.

    The graph is traced from a model on the meta device (no weights); each segment's weights are read
    from the checkpoint when that segment is written, so memory holds one segment's weights at a time.
    """
    cfg = load_config(opts.checkpoint, max_seq_len=opts.max_seq_len)
    comm = ExportComm(rank, opts.tp) if opts.tp > 1 else LocalComm()
    with torch.device("meta"):
        model = Transformer(cfg, tp=opts.tp, rank=rank, comm=comm)
    model = model.to("meta")
    dtype = opts.dtype.torch_dtype
    for module in model.modules():
        for key, p in module._parameters.items():
            module._parameters[key] = torch.nn.Parameter(p.to(dtype), requires_grad=False)
    shape = model.shape
    proto = trace_rank(model.eval(), max_batch=opts.max_batch)
    del model
    name_graph(proto)
    check_rank_graph(proto, cfg, opts.tp)
    cuts = partition(proto)
    del proto
    freqs_cis = precompute_freqs_cis(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    buffers = {"rope_cos": freqs_cis.real.contiguous(), "rope_sin": freqs_cis.imag.contiguous()}
    kinds = segment_kinds(len(cuts), cfg.n_layers)
    segments = []
    with RankWeights(opts.checkpoint, shape, dtype=dtype) as weights:
        def fetch(name: str) -> torch.Tensor:
            return buffers[name] if name in buffers else weights.get(name)

        for k, (kind, layer) in enumerate(kinds):
            cut = cuts[k]
            cuts[k] = None  # the segment's weights are freed as soon as it is on disk
            attach_weights(cut.model, fetch)
            label = kind if layer is None else f"layers.{layer}.{kind}"
            rel = f"rank{rank}/{k:02d}_{label}.onnx"
            data_rel = _write_segment(cut, root, rel)
            segments.append(Segment(
                name=f"{k:02d}_{label}", file=rel, sha256=sha256_file(root / rel), kind=kind, layer=layer,
                inputs=_specs(cut.model, cut.model.graph.input), outputs=_specs(cut.model, cut.model.graph.output),
                collective=Collective(**cut.collective) if cut.collective else None,
                data_file=data_rel, data_sha256=sha256_file(root / data_rel) if data_rel else None,
            ))
            del cut
    return RankEntry(rank=rank, segments=tuple(segments))


def export(opts: ExportOptions) -> Path:
    """Run the whole export; returns the final export directory."""
    cfg = load_config(opts.checkpoint, max_seq_len=opts.max_seq_len)
    check_tp(cfg, opts.tp)
    if opts.dtype is Precision.BF16:
        log.warning("bf16 graphs cannot run on ONNX Runtime's CPU provider; they are meant for GPU backends")
    name = opts.model_name or Path(opts.checkpoint).resolve().name
    final = Path(opts.out) / name / opts.variant
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.variant}.partial-", dir=final.parent))
    try:
        ranks = []
        bar = tqdm(range(opts.tp), desc=f"export {name} {opts.variant}", unit="rank", disable=not opts.progress)
        for rank in bar:
            ranks.append(export_rank(opts, rank, tmp))
        tokenizer = None
        if (Path(opts.checkpoint) / "tokenizer.model").is_file():
            shutil.copyfile(Path(opts.checkpoint) / "tokenizer.model", tmp / "tokenizer.model")
            tokenizer = "tokenizer.model"
        n = cfg.n_layers
        manifest = Manifest(
            model_name=name, variant=opts.variant, model=cfg, tp=opts.tp, dtype=opts.dtype, opset=OPSET,
            ir_version=IR_VERSION, max_batch=opts.max_batch, ranks=tuple(ranks),
            inputs=("tokens", *(f"past_key_{i}" for i in range(n)), *(f"past_value_{i}" for i in range(n))),
            outputs=("logits", *(f"present_key_{i}" for i in range(n)), *(f"present_value_{i}" for i in range(n))),
            exporter_version=__version__,
            custom_nodes={"domain": schema.DOMAIN, "version": schema.VERSION,
                          "ops": [*schema.COMPUTE_OPS, *schema.COLLECTIVE_OPS]},
            tokenizer=tokenizer,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        load_manifest(tmp)  # the written directory must pass the same checks every consumer runs
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` is swapped out whole, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{new.name.rsplit('-', 1)[-1]}")
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

