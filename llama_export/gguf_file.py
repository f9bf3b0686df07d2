"""GGUF files (llama.cpp's format) as checkpoints: which file a `--checkpoint` names, and opening it once.

A GGUF holds the hyper-parameters and the tokenizer as metadata key/value pairs and the weights as
tensors (plain or block-quantized), all in one file; gguf-py (`gguf.GGUFReader`) parses the header and
memory-maps the rest. The readers of each part live where their part belongs: the config in
`config.ModelConfig.from_gguf`, the weights in `model.gguf_format`, the tokenizer in `text.gguf`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_export.errors import CheckpointError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
MAGIC = b"GGUF"
ARCHITECTURE = "llama"  # general.architecture of the files this tool reads
# Folder files that make a folder a Meta or HF checkpoint (model.checkpoint.detect_format): a folder with
# one of them is that format even when a .gguf lies beside it.
_OTHER_FORMAT_FILES = ("params.json", "config.json")


def checkpoint_gguf(path: Path) -> Path | None:
    """The GGUF file `--checkpoint path` names: `path` itself when it is a file, or the only `.gguf` in a
    folder that holds no params.json / config.json; None for any other folder (a missing path too)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir() or any((path / f).is_file() for f in _OTHER_FORMAT_FILES):
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise CheckpointError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                              "pass the one to use: --checkpoint FILE.gguf")
    return found[0] if found else None


def checkpoint_name(path: Path) -> str:
    """A checkpoint's name (export folders, the served model): its folder's name, or a file's without the
    suffix (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`)."""
    path = Path(path).resolve()
    return path.stem if path.is_file() else path.name


def is_gguf(file: Path) -> bool:
    """A file named .gguf, or one that starts with GGUF's magic (whatever its name)."""
    if Path(file).suffix.lower() == SUFFIX:
        return True
    with open(file, "rb") as f:
        return f.read(4) == MAGIC


@dataclass(frozen=True, eq=False)  # one object per opened file (`open_gguf` caches), compared by identity
class GGUFFile:
    """An opened GGUF: its metadata (key -> Python value; arrays as lists) and gguf-py's reader, whose
    tensors' `data` are read-only views into the memory-mapped file."""

    path: Path
    reader: Any  # gguf.GGUFReader
    metadata: Mapping[str, Any] = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} has no metadata key {key!r}; the GGUF is incomplete: convert the model "
                                  "again with llama.cpp's convert_hf_to_gguf.py")
        return self.metadata[key]


def open_gguf(path: Path) -> GGUFFile:
    """The GGUF at `path`, parsed once per process (and again only when the file changes); refuses a file
    that is not a GGUF, is truncated, or is not a LLaMA (`general.architecture`)."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check the --checkpoint path") from None
    return _open(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    import gguf

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
                              "file, or a Meta or Hugging Face checkpoint folder")
    log.info("reading the GGUF header of %s", path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the GGUF is truncated or corrupt: "
                              "download or convert it again") from None
    for t in reader.tensors:  # gguf-py maps what is there; a cut file leaves the last tensors short
        if t.data_offset + int(t.n_bytes) > size:
            raise CheckpointError(f"{path} ends inside tensor {t.name} ({size} bytes, the tensor ends at byte "
                                  f"{t.data_offset + int(t.n_bytes)}); the GGUF is truncated: download or copy it again")
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    g = GGUFFile(path, reader, metadata)
    arch = g.require("general.architecture")
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{path} is a {arch!r} model (general.architecture); this tool reads LLaMA-family "
                              f"GGUFs ({ARCHITECTURE!r}) only")
    return g

