"""`manifest.json`: the single source of truth for consumers of an export directory.

Backends and the runner read segments, I/O names and collectives from here, never from file names.
Every path is relative to the export directory; `load_manifest` refuses any that leaves it and checks
every file's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from llama_export.config import ModelConfig, Precision, WeightQuant
from llama_export.errors import ArtifactError

FORMAT = "llama_export.manifest"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy spelling: float32, float16, bfloat16, int64
    shape: tuple[int | str, ...]  # ints, or symbolic names / expressions ("batch", "past + seq")


@dataclass(frozen=True)
class Collective:
    op: str  # "AllReduce" | "AllGather"
    input: str
    output: str
    axis: int | None = None  # AllGather only


@dataclass(frozen=True)
class Segment:
    name: str
    file: str  # relative POSIX path inside the export directory
    sha256: str
    kind: str  # full | embed | attention | ffn | head | tail
    layer: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    collective: Collective | None  # runs after this segment
    data_file: str | None = None  # external weights (graphs over 2 GB), relative like `file`
    data_sha256: str | None = None


@dataclass(frozen=True)
class TextFile:
    """A tokenizer / chat template / generation config file the export carries for the runner."""

    name: str  # the checkpoint's file name (tokenizer.json, tokenizer_config.json, ...)
    file: str  # relative POSIX path inside the export directory
    sha256: str


@dataclass(frozen=True)
class RankEntry:
    rank: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Manifest:
    model_name: str
    variant: str
    model: ModelConfig
    tp: int
    dtype: Precision  # activations (and weights, unless weight_quant quantizes them)
    opset: int
    ir_version: int
    max_batch: int
    ranks: tuple[RankEntry, ...]
    inputs: tuple[str, ...]  # graph-level inputs: tokens, past_key_0, past_value_0, ...
    outputs: tuple[str, ...]  # graph-level outputs: logits, present_key_0, ...
    exporter_version: str
    custom_nodes: dict[str, Any] = field(default_factory=dict)
    text_files: tuple[TextFile, ...] = ()  # what the checkpoint had of llama_export.text.TEXT_FILES
    weight_quant: WeightQuant | None = None  # the weight-only quantization scheme (None: float weights)
    quantized_weights: tuple[str, ...] = ()  # the parameters it quantized (the same names on every rank)

    # ---- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["dtype"] = self.dtype.value
        d["weight_quant"] = self.weight_quant.to_dict() if self.weight_quant else None
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **d}, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"not a llama_export manifest of format version {FORMAT_VERSION} "
                f"(format={d.get('format')!r}, format_version={d.get('format_version')!r}); re-export"
            )
        try:
            ranks = tuple(
                RankEntry(
                    rank=int(r["rank"]),
                    segments=tuple(
                        Segment(
                            name=s["name"],
                            file=s["file"],
                            sha256=s["sha256"],
                            kind=s["kind"],
                            layer=s["layer"],
                            inputs=tuple(_spec(t) for t in s["inputs"]),
                            outputs=tuple(_spec(t) for t in s["outputs"]),
                            collective=Collective(**s["collective"]) if s["collective"] else None,
                            data_file=s.get("data_file"),
                            data_sha256=s.get("data_sha256"),
                        )
                        for s in r["segments"]
                    ),
                )
                for r in d["ranks"]
            )
            return cls(
                model_name=d["model_name"],
                variant=d["variant"],
                model=ModelConfig.from_dict(d["model"]),
                tp=int(d["tp"]),
                dtype=Precision(d["dtype"]),
                opset=int(d["opset"]),
                ir_version=int(d["ir_version"]),
                max_batch=int(d["max_batch"]),
                ranks=ranks,
                inputs=tuple(d["inputs"]),
                outputs=tuple(d["outputs"]),
                exporter_version=d["exporter_version"],
                custom_nodes=dict(d.get("custom_nodes", {})),
                text_files=tuple(TextFile(**t) for t in d.get("text_files", ())),
                weight_quant=WeightQuant.from_dict(d["weight_quant"]) if d.get("weight_quant") else None,
                quantized_weights=tuple(d.get("quantized_weights", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest is malformed ({type(e).__name__}: {e}); re-export") from None

    def rank(self, r: int) -> RankEntry:
        if not 0 <= r < len(self.ranks):
            raise ArtifactError(f"rank {r} is not in this export (tp={self.tp})")
        return self.ranks[r]


def _spec(t: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=t["name"], dtype=t["dtype"], shape=tuple(t["shape"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths, `..`, and symlinks that lead out of `root`."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or not rel:
        raise ArtifactError(f"manifest path {rel!r} leaves the export directory {root}; re-export")
    root_r = Path(root).resolve()
    full = (root_r / p).resolve()
    if root_r != full and root_r not in full.parents:
        raise ArtifactError(f"manifest path {rel!r} resolves outside {root} (a symlink?); re-export")
    return full


def load_manifest(root: Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and check `root/manifest.json`: paths stay inside `root`, files exist, hashes match."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}; point --artifacts at an export directory written by "
            "`llama-export export` (graphs/<model>/<variant>)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export") from None
    m = Manifest.from_dict(data)
    if len(m.ranks) != m.tp or [r.rank for r in m.ranks] != list(range(m.tp)):
        raise ArtifactError(f"{path}: tp={m.tp} but ranks {[r.rank for r in m.ranks]} are listed; re-export")
    files = [f for r in m.ranks for s in r.segments for f in (s.file, s.data_file) if f]
    files += [t.file for t in m.text_files]
    for rel in files:
        f = resolve_inside(root, rel)
        if not f.is_file():
            raise ArtifactError(f"{rel} is listed in {path} but missing; re-export")
    if verify_hashes:
        for r in m.ranks:
            for s in r.segments:
                for rel, want in ((s.file, s.sha256), (s.data_file, s.data_sha256)):
                    if rel is None:
                        continue
                    got = sha256_file(resolve_inside(root, rel))
                    if got != want:
                        raise _hash_error(rel, got, want)
        text_file_paths(root, m)
    return m


def text_file_paths(root: Path, m: Manifest) -> dict[str, Path]:
    """name -> path of each text file the export carries, checked against its sha256 (they are small,
    so this is checked on every use, also where segment hashes are skipped)."""
    out = {}
    for t in m.text_files:
        path = resolve_inside(root, t.file)
        if not path.is_file():
            raise ArtifactError(f"{t.file} is listed in {Path(root) / MANIFEST_NAME} but missing; re-export")
        if (got := sha256_file(path)) != t.sha256:
            raise _hash_error(t.file, got, t.sha256)
        out[t.name] = path
    return out


def _hash_error(rel: str, got: str, want: str | None) -> ArtifactError:
    return ArtifactError(f"{rel} has sha256 {got[:12]}... but the manifest says {str(want)[:12]}...: "
                         "the file was modified or truncated after export; re-export")
