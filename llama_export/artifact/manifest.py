"""`manifest.json`: the single source of truth for consumers of an export directory.

Backends and the runner read segments, I/O names and collectives from here, never from file names.
Every path is relative to the export directory; `load_manifest` refuses any that leaves it and checks
every file's sha256 (`verify_files`, which skips files recorded unchanged since they were hashed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from llama_export import dtypes
from llama_export.artifact.verified import Stamp, VerifiedFiles
from llama_export.config import ModelConfig, ModelDType, Precision, TPDegree, WeightQuant
from llama_export.errors import ArtifactError
from llama_export.parsing import parse_json, read_bytes

log = logging.getLogger(__name__)

FORMAT = "llama_export.manifest"
FORMAT_VERSION = 2  # 2: in-place KV cache of a chosen capacity, ragged batches, packed projections
MANIFEST_NAME = "manifest.json"
# An export that failed validation is kept beside its target as `<variant>.failed` (for `compare`);
# whatever runs it is told that its numbers may be wrong.
FAILED_SUFFIX = ".failed"


def failed_path(target: Path) -> Path:
    """Where the export of `target` (`graphs/<model>/<variant>`) goes when it fails validation."""
    return target.with_name(target.name + FAILED_SUFFIX)


def failed_validation(export_dir: Path) -> bool:
    """`export_dir` is an export kept after it failed validation (`failed_path`)."""
    return Path(export_dir).resolve().name.endswith(FAILED_SUFFIX)


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# Names that become path components (engines/<model_name>/<variant>): no separators, no leading dot.
PATH_NAME = r"[^./\\\x00][^/\\\x00]{0,199}"


def _path_name(value: str) -> str:
    if not re.fullmatch(PATH_NAME, value):
        raise ValueError("must be one folder name (no '/', no '\\', not starting with '.')")
    return value


PathName = Annotated[str, AfterValidator(_path_name)]
MAX_BATCH = 1 << 16
SegmentKind = Literal["full", "embed", "attention", "ffn", "head", "tail"]
ElementType = Literal[tuple(d.name for d in dtypes.DTYPES)]  # numpy spelling, as dtypes names them


@dataclass(frozen=True)
class TensorSpec:
    name: Name
    dtype: ElementType  # numpy spelling: float32, float16, bfloat16, int64
    shape: tuple[Annotated[int, Field(ge=0)] | Name, ...]  # ints, or symbolic names / expressions ("batch", "seq", "capacity")


@dataclass(frozen=True)
class Collective:
    op: Literal["AllReduce", "AllGather"]
    input: Name
    output: Name
    axis: int | None = None  # AllGather only


@dataclass(frozen=True)
class LoweredFiles:
    """A backend's lowering of a segment, written at export time, so that running it needs no graph
    rewriting (and no graph library): the graph `file` reads its weights from the segment's own
    `data_file` where the lowering kept them and from `data_file` here where it repacked them (quantized
    weights in a kernel's layout). Paths are relative like `Segment.file`."""

    file: str
    sha256: Sha256
    data_file: Name | None = None
    data_sha256: Sha256 | None = None


@dataclass(frozen=True)
class Segment:
    name: Name
    file: str  # relative POSIX path inside the export directory (`resolve_inside` checks it)
    sha256: Sha256
    kind: SegmentKind
    layer: Annotated[int, Field(ge=0)] | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    collective: Collective | None  # runs after this segment
    data_file: Name | None = None  # the weights (ONNX external data), relative like `file`; None: no weights
    data_sha256: Sha256 | None = None
    ort: LoweredFiles | None = None  # the segment lowered for ONNX Runtime (`backends.ort`), if written

    def files(self) -> list[tuple[str, str]]:
        """(relative path, sha256) of every file of this segment: graph, weights, lowered graph and its
        repacked weights."""
        pairs = [(self.file, self.sha256), (self.data_file, self.data_sha256)]
        if self.ort is not None:
            pairs += [(self.ort.file, self.ort.sha256), (self.ort.data_file, self.ort.data_sha256)]
        return [(rel, sha) for rel, sha in pairs if rel is not None]


@dataclass(frozen=True)
class TextFile:
    """A tokenizer / chat template / generation config file the export carries for the runner."""

    name: PathName  # the checkpoint's file name (tokenizer.json, tokenizer_config.json, ...)
    file: str  # relative POSIX path inside the export directory (`resolve_inside` checks it)
    sha256: Sha256


@dataclass(frozen=True)
class RankEntry:
    rank: Annotated[int, Field(ge=0)]
    segments: tuple[Segment, ...]


def _weight_quant(value: Any) -> Any:
    """The manifest's weight_quant dict (`WeightQuant.to_dict`) as a WeightQuant."""
    if value is None or isinstance(value, WeightQuant):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be an object (bits, block_size, output, embedding, symmetric, search) or null")
    try:
        return WeightQuant.from_dict(value)
    except TypeError as e:  # an unknown or missing field
        raise ValueError(f"is not a weight quantization scheme ({e})") from None


@dataclass(frozen=True)
class Manifest:
    model_name: PathName
    variant: PathName
    model: ModelConfig
    tp: TPDegree
    dtype: Precision  # activations (and weights, unless weight_quant quantizes them)
    opset: Annotated[int, Field(ge=1, le=1000)]
    ir_version: Annotated[int, Field(ge=1, le=1000)]
    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    ranks: tuple[RankEntry, ...]
    inputs: tuple[Name, ...]  # graph-level inputs: tokens, cache_lengths, token_lengths, past_key_0, ...
    outputs: tuple[Name, ...]  # graph-level outputs: logits, present_key_0, ...
    exporter_version: Name
    custom_nodes: dict[str, Any] = field(default_factory=dict)
    text_files: tuple[TextFile, ...] = ()  # what the checkpoint had of llama_export.text.TEXT_FILES
    # the weight-only quantization scheme (None: float weights), and the parameters it quantized (the
    # same names on every rank)
    weight_quant: Annotated[WeightQuant | None, BeforeValidator(_weight_quant)] = None
    quantized_weights: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        """Consistency of the fields with each other (`load_manifest` checks them against the files)."""
        dtype = ModelDType(self.dtype, self.weight_quant)
        if self.variant != f"tp{self.tp}-{dtype}":
            raise ValueError(f"variant={self.variant!r} does not match tp={self.tp}, dtype={str(dtype)!r}")
        if [r.rank for r in self.ranks] != list(range(self.tp)):
            raise ValueError(f"tp={self.tp} but ranks {[r.rank for r in self.ranks]} are listed")
        for r in self.ranks:
            if not r.segments:
                raise ValueError(f"rank {r.rank} lists no segments")
            for s in r.segments:
                if s.layer is not None and s.layer >= self.model.n_layers:
                    raise ValueError(f"segment {s.name} has layer={s.layer} but the model has "
                                     f"n_layers={self.model.n_layers}")
                for f in (s, s.ort):
                    if f is not None and (f.data_file is None) != (f.data_sha256 is None):
                        raise ValueError(f"segment {s.name} needs both data_file and data_sha256, or neither")

    # ---- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["dtype"] = self.dtype.value
        d["weight_quant"] = self.weight_quant.to_dict() if self.weight_quant else None
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **d}, indent=2)

    @classmethod
    def from_json(cls, raw: bytes | str, *, source: str, fix: str = "re-export") -> Manifest:
        """Parse manifest JSON strictly (types, ranges, consistency); errors name `source`."""
        header = parse_json(raw, _Header, source=source, fix=fix, error=ArtifactError)
        if header.format != FORMAT or header.format_version != FORMAT_VERSION:
            raise ArtifactError(
                f"{source} is not a llama_export manifest of format version {FORMAT_VERSION} "
                f"(format={header.format!r}, format_version={header.format_version!r}); {fix}"
            )
        return parse_json(raw, cls, source=source, fix=fix, error=ArtifactError)

    def rank(self, r: int) -> RankEntry:
        if not 0 <= r < len(self.ranks):
            raise ArtifactError(f"rank {r} is not in this export (tp={self.tp})")
        return self.ranks[r]


@dataclass(frozen=True)
class _Header:
    format: Any = None
    format_version: Any = None


def sha256_file(path: Path, *, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
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


def load_manifest(root: Path, *, verify_hashes: bool = True, rehash: bool = False) -> Manifest:
    """Read and check `root/manifest.json`: paths stay inside `root`, files exist, hashes match
    (`verify_files`: files recorded as unchanged since they were hashed are not read, unless `rehash`)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}; point --artifacts at an export directory written by "
            "`llama-export export` (graphs/<model>/<variant>)"
        )
    m = Manifest.from_json(read_bytes(path, error=ArtifactError), source=str(path))
    files = [rel for r in m.ranks for s in r.segments for rel, _ in s.files()]
    files += [t.file for t in m.text_files]
    for rel in files:
        f = resolve_inside(root, rel)
        if not f.is_file():
            raise ArtifactError(f"{rel} is listed in {path} but missing; re-export")
    if verify_hashes:
        verify_files(root, [f for r in m.ranks for f in rank_files(m, r.rank)], rehash=rehash)
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


def rank_files(m: Manifest, rank: int) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file rank `rank` reads: its graphs, their data files and their
    lowered forms."""
    return [pair for s in m.rank(rank).segments for pair in s.files()]


def verify_rank(m: Manifest, root: Path, rank: int, *, on_bytes: Callable[[int], None] | None = None,
                rehash: bool = False) -> None:
    """`verify_files` of rank `rank`'s files only: a rank process checks what it opens, once."""
    verify_files(root, rank_files(m, rank), on_bytes=on_bytes, rehash=rehash)


def verify_files(root: Path, files: list[tuple[str, str]], *, on_bytes: Callable[[int], None] | None = None,
                 rehash: bool = False, fix: str = "re-export") -> None:
    """Check each (relative path, sha256) of `files` under `root`, hashing it unless the records of
    `artifact.verified` (its trust model is there) say it has not changed since it hashed to that
    sha256; `rehash` hashes every file. Files that hash right are recorded. `on_bytes(n)`: n more bytes
    verified (progress), as a file is read, or a whole file at once when its record vouches for it.
    `fix`: what the error line tells the user to do about a missing or changed file."""
    records = VerifiedFiles(root)
    try:
        for rel, want in files:
            path = resolve_inside(root, rel)
            seen_ns = time.time_ns()
            try:
                stamp = Stamp.of(path.stat())
            except OSError as e:
                raise ArtifactError(f"{rel} is listed in the manifest but cannot be read ({e.strerror}); "
                                    f"{fix}") from None
            if not rehash and records.known(path, want, stamp):
                log.debug("%s: unchanged since it was verified", rel)
                if on_bytes is not None:
                    on_bytes(stamp.size)
                continue
            got = sha256_file(path, on_bytes=on_bytes)
            if got != want:
                records.forget(path)
                raise _hash_error(rel, got, want, fix)
            records.add(path, want, stamp, seen_ns=seen_ns)
    finally:
        records.save()


def _hash_error(rel: str, got: str, want: str | None, fix: str = "re-export") -> ArtifactError:
    return ArtifactError(f"{rel} has sha256 {got[:12]}... but the manifest says {str(want)[:12]}...: "
                         f"the file was modified or truncated after it was written; {fix}")
