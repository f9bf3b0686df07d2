"""Where a run's model comes from: a checkpoint (eager) or an export / engine directory (ort, trt).

`ModelSource` is resolved once from the command line and handed to the runner and the comparison
engine; it answers the questions they ask of it (config, manifest, tokenizer, step function) without
either of them branching on the backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_export.artifact.manifest import Manifest, resolve_inside
from llama_export.backends import artifact_manifest, open_backend
from llama_export.config import Backend, ModelConfig, Precision
from llama_export.errors import InputError
from llama_export.parallel.comm import Communicator
from llama_export.runner.generate import StepFn


def default_checkpoint() -> Path:
    from llama_export.demo import DEMO_DIR

    return DEMO_DIR


@dataclass(frozen=True)
class ModelSource:
    backend: Backend
    checkpoint: Path | None = None  # eager: Meta or HF folder (None: the demo model)
    artifacts: Path | None = None  # ort: export directory; trt: engine directory
    dtype: Precision = Precision.FP32  # eager only: exports carry their own

    def __post_init__(self) -> None:
        if self.backend is not Backend.EAGER and self.artifacts is None:
            raise InputError(f"--backend {self.backend.value} runs an export: pass --artifacts DIR")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint is not None else default_checkpoint()

    def manifest(self, *, verify_hashes: bool = True) -> Manifest:
        """The export manifest (not for eager)."""
        return artifact_manifest(self.backend, self.artifacts, verify_hashes=verify_hashes)

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

    def tokenizer_path(self) -> Path:
        if self.backend is not Backend.EAGER:
            m = self.manifest(verify_hashes=False)
            if m.tokenizer is None:
                raise InputError(
                    f"the export at {self.artifacts} has no tokenizer.model (its checkpoint had none); "
                    "use --prompt-ids, or re-export from a checkpoint folder that holds tokenizer.model"
                )
            return resolve_inside(self.artifacts, m.tokenizer)
        path = self.checkpoint_dir / "tokenizer.model"
        if not path.is_file():
            raise InputError(f"{self.checkpoint_dir} has no tokenizer.model; copy the model's tokenizer there "
                             "or use --prompt-ids")
        return path

    def tokenizer(self) -> Tokenizer:
        """The sentencepiece tokenizer of the checkpoint or export (`encode` prepends BOS)."""
        return Tokenizer(_load_sp(self.tokenizer_path()))

    def step(self, *, comm: Communicator, device: torch.device):
        """(step function, make_cache(batch) -> empty KV cache, model config) for this rank."""
        if self.backend is Backend.EAGER:
            from llama_export.model.checkpoint import build_model

            model = build_model(self.checkpoint_dir, tp=comm.world_size, rank=comm.rank, comm=comm,
                                dtype=self.dtype.torch_dtype, device=device)
            step: StepFn = model
            return step, model.empty_cache, model.cfg
        from llama_export.runner.stitch import empty_cache, segmented_step

        manifest = self.manifest()
        backend = open_backend(self.backend, manifest, self.artifacts, rank=comm.rank, device=device)
        step = segmented_step(manifest, backend, comm=comm)

        def make_cache(batch: int):
            return empty_cache(manifest, comm.rank, batch, device=backend.device)

        return step, make_cache, manifest.model


@functools.lru_cache(maxsize=4)
def _load_sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


class Tokenizer:
    """Sentencepiece with LLaMA conventions: BOS prepended on encode, EOS ends generation."""

    def __init__(self, sp) -> None:
        self.sp = sp
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if self.bos_id >= 0 else []) + ids if ids else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
