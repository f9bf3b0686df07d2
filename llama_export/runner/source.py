"""Where a run's model comes from: a checkpoint (eager) or an export / engine directory (ort, trt).

`ModelSource` is the description from the command line. `ModelSource.resolve()` gives the
`ResolvedSource` that is handed down to every consumer (run, eval, compare, the engine, a rank's step
construction): it answers the questions they ask (config, manifest, tokenizer, step function) without
any of them branching on the backend, and reads each thing once per process, when first asked:

    manifest.json   parsed once (no hashes; files are verified where they are opened: `verify`)
    config          loaded once (the checkpoint's, or the manifest's)
    text files      hashed once against the manifest (an export's copies)
    tokenizer       loaded once (never, where nothing asks for text)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
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
    """The checkpoint a command uses without --checkpoint / --model: the built-in demo model."""
    from llama_export.models import model_checkpoint

    return model_checkpoint("demo")


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

    def resolve(self) -> ResolvedSource:
        """This source, to be resolved once and handed to everything that needs it."""
        return ResolvedSource(self)


@dataclass(frozen=True)
class ResolvedSource:
    """A `ModelSource` whose manifest, config, text files and tokenizer are read at most once each, on
    first use (cached on this object; build it once per process with `ModelSource.resolve()`)."""

    source: ModelSource

    @property
    def backend(self) -> Backend:
        return self.source.backend

    @property
    def artifacts(self) -> Path | None:
        return self.source.artifacts

    @property
    def checkpoint_dir(self) -> Path:
        return self.source.checkpoint_dir

    @cached_property
    def manifest(self) -> Manifest:
        """The export manifest (not for eager), parsed once; files are hashed where opened (`verify`)."""
        return artifact_manifest(self.backend, self.artifacts, verify_hashes=False)

    @cached_property
    def config(self) -> ModelConfig:
        if self.backend is Backend.EAGER:
            from llama_export.model.checkpoint import load_config

            return load_config(self.checkpoint_dir)
        return self.manifest.model

    def check_tp(self, tp: int) -> None:
        """An export runs at the TP degree it was exported for."""
        if self.backend is not Backend.EAGER and self.manifest.tp != tp:
            m = self.manifest
            raise InputError(f"the export at {self.artifacts} is for tp={m.tp}, not --tp {tp}; use --tp {m.tp}")

    def verify(self, ranks: Iterable[int], *, progress: bool = False) -> None:
        """Hash the files of `ranks` (an ONNX Runtime export; trt engine directories carry no file hashes
        and their runner checks its plans) before they are opened; `progress` shows a bar."""
        if self.backend is not Backend.ORT:
            return
        ranks = list(ranks)
        total = sum(resolve_inside(self.artifacts, rel).stat().st_size
                    for r in ranks for rel, _ in rank_files(self.manifest, r))
        what = f"rank {ranks[0]}: verifying its files" if len(ranks) == 1 else "verifying the export's files"
        with byte_bar(total, what, enabled=progress) as bar:
            for r in ranks:
                verify_rank(self.manifest, self.artifacts, r, on_bytes=bar.update, rehash=self.source.rehash)

    @property
    def text_place(self) -> str:
        """Where the text files are, for messages."""
        if self.backend is Backend.EAGER:
            return str(self.checkpoint_dir)
        return f"the export at {self.artifacts}"

    @cached_property
    def text_files(self) -> dict[str, Path]:
        """The model's text files (name -> path; `llama_export.text.TEXT_FILES`): an export's copies,
        hashed against its manifest once, else the checkpoint's."""
        if self.backend is Backend.EAGER:
            return text_files_in(self.checkpoint_dir)
        files = text_file_paths(self.artifacts, self.manifest)
        if not any(name in files for name in TOKENIZER_FILES):
            raise InputError(
                f"the export at {self.artifacts} has no tokenizer (its checkpoint had no tokenizer.model or "
                "tokenizer.json); use --prompt-ids, or re-export from a checkpoint folder that holds one"
            )
        return files

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, whatever its format (see `llama_export.text`)."""
        return load_tokenizer(self.text_files, source=self.text_place)

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
            model = build_model(self.checkpoint_dir, cfg=self.config, tp=comm.world_size, rank=comm.rank,
                                comm=comm, dtype=self.source.dtype.torch_dtype, device=device,
                                weights=self.source.weights)
            return model.step, model.empty_cache, model.cfg
        from llama_export.runner.stitch import backend_capacity, empty_cache, segmented_step

        manifest = self.manifest
        self.verify([comm.rank], progress=progress)
        backend = open_backend(self.backend, manifest, self.artifacts, rank=comm.rank, device=device,
                               threads=threads, rehash=self.source.rehash)
        step = segmented_step(manifest, backend, comm=comm)

        def make_cache(batch: int, capacity: int):
            capacity = backend_capacity(self.backend, manifest, capacity)
            return empty_cache(manifest, comm.rank, batch, capacity, backend=backend)

        return step, make_cache, manifest.model
