"""Step functions per backend, the model config and the tokenizer for a run."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from llama_export.config import Backend, ModelConfig
from llama_export.errors import BackendUnavailableError, InputError
from llama_export.parallel.comm import Communicator
from llama_export.runner.generate import StepFn


def default_checkpoint() -> Path:
    from llama_export.demo import DEMO_DIR

    return DEMO_DIR


def config_for(opts) -> ModelConfig:
    if opts.backend is Backend.EAGER:
        from llama_export.model.checkpoint import load_config

        return load_config(opts.checkpoint or default_checkpoint())
    m = manifest_for(opts, verify_hashes=False)
    if m.tp != opts.tp:
        raise InputError(f"the export at {opts.artifacts} is for tp={m.tp}, not --tp {opts.tp}; use --tp {m.tp}")
    return m.model


def manifest_for(opts, *, verify_hashes: bool = True):
    """The export manifest behind `--artifacts` (for trt: the copy inside the engine directory)."""
    if opts.artifacts is None:
        raise InputError(f"--backend {opts.backend.value} runs an export: pass --artifacts DIR")
    if opts.backend is Backend.TENSORRT:
        from llama_export.backends.tensorrt.plugins import import_tensorrt
        from llama_export.backends.tensorrt.runner import load_export_manifest

        import_tensorrt()  # say what to install before anything else

        return load_export_manifest(opts.artifacts)
    from llama_export.export.manifest import load_manifest

    return load_manifest(opts.artifacts, verify_hashes=verify_hashes)


@functools.lru_cache(maxsize=4)
def _load_sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def tokenizer_path(opts) -> Path:
    if opts.backend is not Backend.EAGER and opts.artifacts is not None:
        from llama_export.export.manifest import resolve_inside

        m = manifest_for(opts, verify_hashes=False)
        if m.tokenizer is None:
            raise InputError(
                f"the export at {opts.artifacts} has no tokenizer.model (its checkpoint had none); "
                "use --prompt-ids, or re-export from a checkpoint folder that holds tokenizer.model"
            )
        return resolve_inside(opts.artifacts, m.tokenizer)
    ckpt = opts.checkpoint or default_checkpoint()
    path = Path(ckpt) / "tokenizer.model"
    if not path.is_file():
        raise InputError(f"{ckpt} has no tokenizer.model; copy the model's tokenizer there or use --prompt-ids")
    return path


def tokenizer_for(opts):
    """The sentencepiece tokenizer of the checkpoint or export (`encode` adds no BOS; see `encode`)."""
    return Tokenizer(_load_sp(tokenizer_path(opts)))


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


def build_step(opts, *, comm: Communicator, device: torch.device):
    """(step function, make_cache(batch) -> empty KV cache, model config, EOS id) for this rank."""
    eos_id = None
    if opts.prompts is not None:
        eos_id = tokenizer_for(opts).eos_id
    if opts.backend is Backend.EAGER:
        from llama_export.model.checkpoint import build_model

        model = build_model(
            opts.checkpoint or default_checkpoint(), tp=opts.tp, rank=comm.rank, comm=comm,
            dtype=opts.dtype.torch_dtype, device=device,
        )
        step: StepFn = model
        return step, model.empty_cache, model.cfg, eos_id
    from llama_export.runner.stitch import empty_cache, segmented_step

    manifest = manifest_for(opts)
    backend = open_backend(opts.backend, manifest, opts.artifacts, rank=comm.rank, device=device)
    step, _, cfg = segmented_step(manifest, backend, comm=comm, batch=1)

    def make_cache(batch: int):
        return empty_cache(manifest, comm.rank, batch, device=backend.device)

    return step, make_cache, cfg, eos_id


def open_backend(backend: Backend, manifest, root: Path, *, rank: int, device: torch.device,
                 extra_outputs: tuple[str, ...] = ()):
    """The RankBackend of `backend` for one rank of an export (or engine) directory.

    `extra_outputs`: values inside the graphs to return as well where the backend can (ORT; used by
    `compare` to look inside a TP=1 graph)."""
    if backend is Backend.ORT:
        from llama_export.backends.ort import OrtBackend

        return OrtBackend(manifest, root, rank=rank, device=device, extra_outputs=extra_outputs)
    if backend is Backend.TENSORRT:
        try:
            from llama_export.backends.tensorrt.runner import TensorRTBackend
        except ImportError as e:
            raise BackendUnavailableError(f"the TensorRT backend is not available here ({e})") from None
        return TensorRTBackend(root, rank=rank, device=device)
    raise InputError(f"unknown backend {backend!r}; choose eager, ort or trt")
