"""Where a run's model comes from: a checkpoint (eager) or an export / engine directory (ort, trt).

`ModelSource` is resolved once from the command line and handed to the runner and the comparison
engine; it answers the questions they ask of it (config, manifest, tokenizer, step function) without
either of them branching on the backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llama_export.artifact.manifest import (
    FAILED_SUFFIX,
    Manifest,
    failed_validation,
    rank_files,
    resolve_inside,
    text_file_paths,
    verify_rank,
)
from llama_export.backends import artifact_manifest, open_backend
from llama_export.config import Backend, ModelConfig, Precision, WeightQuant
from llama_export.errors import InputError
from llama_export.parallel.comm import Communicator
from llama_export.progress import byte_bar
from llama_export.runner.step import MakeCache, StepFn
from llama_export.text import Tokenizer, load_tokenizer, text_files_in
from llama_export.text.files import TOKENIZER_FILES

log = logging.getLogger(__name__)


def default_checkpoint() -> Path:
    from llama_export.demo import DEMO_DIR

    return DEMO_DIR


@dataclass(frozen=True)
class ModelSource:
    backend: Backend
    # eager: the Meta or HF folder it runs (None: the demo model); ort/trt: only `compare` reads it, as the
    # checkpoint the export came from (`check_runs_alone` refuses it elsewhere)
    checkpoint: Path | None = None
    artifacts: Path | None = None  # ort: export directory; trt: engine directory
    dtype: Precision = Precision.FP32  # eager only: exports carry their own
    weights: WeightQuant | None = None  # eager only: run with these weights quantized and dequantized
    rehash: bool = False  # hash every file (ort) or plan (trt), also those recorded unchanged since verified

    def __post_init__(self) -> None:
        if self.backend is not Backend.EAGER and self.artifacts is None:
            raise InputError(f"--backend {self.backend.value} runs an export: pass --artifacts DIR")
        if self.backend is Backend.EAGER and self.artifacts is not None:
            raise InputError(f"--backend eager runs a checkpoint, not the export --artifacts {self.artifacts}; "
                             "pass --checkpoint DIR (or nothing: the demo model), or --backend ort to run the export")

    def check_runs_alone(self) -> None:
        """For commands that run this source and nothing else (`run`, `eval`), once: an export carries its
        own model, so a checkpoint beside it would be ignored; an export kept after it failed validation
        runs, with a warning (`compare`, which is for such exports, does not call this)."""
        if self.backend is not Backend.EAGER and self.checkpoint is not None:
            raise InputError(f"--backend {self.backend.value} runs the export --artifacts {self.artifacts}, not "
                             f"--checkpoint {self.checkpoint}; drop --checkpoint, or use --backend eager to run the "
                             "checkpoint")
        if self.artifacts is not None and failed_validation(self.artifacts):
            log.warning("the export at %s failed validation against eager (a `%s` export): its numbers may be "
                        "wrong; re-export it, or see where it diverges with `llama-export compare`",
                        self.artifacts, FAILED_SUFFIX)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint is not None else default_checkpoint()

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The folders a command reads from this source (no output may go inside them)."""
        return (self.checkpoint_dir,) if self.artifacts is None else (Path(self.artifacts), self.checkpoint_dir)

    def manifest(self, *, verify_hashes: bool = True) -> Manifest:
        """The export manifest (not for eager)."""
        return artifact_manifest(self.backend, self.artifacts, verify_hashes=verify_hashes, rehash=self.rehash)

    def config(self) -> ModelConfig:
        if self.backend is Backend.EAGER:
            from llama_export.model.checkpoint import load_config

            return load_config(self.checkpoint_dir)
        return self.manifest(verify_hashes=False).model

    def check_tp(self, tp: int) -> None:
        """An export runs at the TP degree it was exported for."""
        if self.backend is not Backend.EAGER:
            m = self.manifest(verify_hashes=False)
            if m.tp != tp:
                raise InputError(f"the export at {self.artifacts} is for tp={m.tp}, not --tp {tp}; use --tp {m.tp}")

    def text_files(self) -> tuple[dict[str, Path], str]:
        """The model's text files (name -> path; `llama_export.text.TEXT_FILES`) and how to name their
        place in messages: an export's hashed copies (checked on every use), else the checkpoint's."""
        if self.backend is Backend.EAGER:
            return text_files_in(self.checkpoint_dir), str(self.checkpoint_dir)
        files = text_file_paths(self.artifacts, self.manifest(verify_hashes=False))
        if not any(name in files for name in TOKENIZER_FILES):
            raise InputError(
                f"the export at {self.artifacts} has no tokenizer (its checkpoint had no tokenizer.model or "
                "tokenizer.json); use --prompt-ids, or re-export from a checkpoint folder that holds one"
            )
        return files, f"the export at {self.artifacts}"

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, whatever its format (see `llama_export.text`)."""
        files, where = self.text_files()
        return load_tokenizer(files, source=where)

    def step(self, *, comm: Communicator, device: str, threads: int | None = None,
             progress: bool = False) -> tuple[StepFn, MakeCache, ModelConfig]:
        """(step function, make_cache(batch, capacity) -> empty KV cache, model config) for this rank,
        computing with `threads` CPU threads (None: the libraries' defaults).

        An export rank hashes and opens only its own files, once; `progress` shows the hashing. Only the
        eager model imports torch here."""
        if self.backend is Backend.EAGER:
            import torch

            from llama_export.model.checkpoint import build_model

            if threads is not None:
                torch.set_num_threads(threads)
            model = build_model(self.checkpoint_dir, tp=comm.world_size, rank=comm.rank, comm=comm,
                                dtype=self.dtype.torch_dtype, device=device, weights=self.weights)
            return model.step, model.empty_cache, model.cfg
        from llama_export.runner.stitch import backend_capacity, empty_cache, segmented_step

        manifest = self.manifest(verify_hashes=False)
        if self.backend is Backend.ORT:  # trt engine directories carry no file hashes
            total = sum(resolve_inside(self.artifacts, rel).stat().st_size
                        for rel, _ in rank_files(manifest, comm.rank))
            with byte_bar(total, f"rank {comm.rank}: verifying its files", enabled=progress) as bar:
                verify_rank(manifest, self.artifacts, comm.rank, on_bytes=bar.update, rehash=self.rehash)
        backend = open_backend(self.backend, manifest, self.artifacts, rank=comm.rank, device=device, threads=threads,
                               rehash=self.rehash)
        step = segmented_step(manifest, backend, comm=comm)

        def make_cache(batch: int, capacity: int):
            capacity = backend_capacity(self.backend, manifest, capacity)
            return empty_cache(manifest, comm.rank, batch, capacity, backend=backend)

        return step, make_cache, manifest.model
