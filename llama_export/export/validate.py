"""Validate an export against the eager model: prefill plus greedy decode steps, every rank.

The reference is the eager model at TP=1 in the export's dtype, loaded from the checkpoint. The backend
runs all ranks of the export in one process (`ThreadGroup`: real data exchange between rank threads)
and is teacher-forced with the reference's greedy tokens, so one early token flip cannot hide or
inflate the error of every later step; the greedy agreement is reported separately.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llama_export.compare import LOGITS_ATOL, Comparison, TensorDiff
from llama_export.config import Backend
from llama_export.export.manifest import Manifest, load_manifest
from llama_export.model.checkpoint import build_model
from llama_export.parallel.comm import ThreadGroup
from llama_export.runner.generate import generate
from llama_export.runner.stitch import segmented_step


def reference_run(checkpoint: Path, manifest: Manifest, prompt: torch.Tensor, steps: int):
    """Eager TP=1 greedy run: (per-step logits, per-step tokens)."""
    model = build_model(checkpoint, dtype=manifest.dtype.torch_dtype, max_seq_len=manifest.model.max_seq_len)
    res = generate(model, prompt, model.empty_cache(prompt.shape[0]), max_new_tokens=steps)
    return [s.logits for s in res.steps], [s.tokens for s in res.steps]


def backend_forced_run(export_dir: Path, manifest: Manifest, backend: Backend, prompt: torch.Tensor,
                       forced: list[torch.Tensor]) -> list[torch.Tensor]:
    """Backend logits for the prompt and then each forced token, all ranks in one process."""
    from llama_export.runner.steps import open_backend

    def rank_fn(rank: int, comm) -> list[torch.Tensor]:
        be = open_backend(backend, manifest, export_dir, rank=rank, device=torch.device("cpu"))
        step, (keys, values), _ = segmented_step(manifest, be, comm=comm, batch=prompt.shape[0])
        out, tokens = [], prompt
        with torch.inference_mode():
            for nxt in [None, *forced[:-1]]:
                if nxt is not None:
                    tokens = nxt.unsqueeze(1)
                logits, keys, values = step(tokens, keys, values)
                out.append(logits)
        be.close()
        return out

    return ThreadGroup(manifest.tp).run(rank_fn)[0]


def validate_export(export_dir: Path, checkpoint: Path, *, backend: Backend = Backend.ORT, steps: int = 8,
                    batch: int = 2, prompt_len: int = 5, seed: int = 0) -> Comparison:
    manifest = load_manifest(export_dir)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, manifest.model.vocab_size, (batch, prompt_len), generator=g)
    t0 = time.perf_counter()
    ref_logits, ref_tokens = reference_run(checkpoint, manifest, prompt, steps)
    got = backend_forced_run(export_dir, manifest, backend, prompt, ref_tokens)
    cmp = Comparison(label=f"{manifest.variant} {backend.value} vs eager", tolerance=LOGITS_ATOL[manifest.dtype.value])
    agree = 0
    for i, (a, e) in enumerate(zip(got, ref_logits)):
        cmp.logits.append(TensorDiff.of(f"step {i} logits", a, e, logits=True))
        agree += int(torch.equal(a.argmax(-1), ref_tokens[i]))
    cmp.tokens_agree = agree / len(got)
    cmp.seconds = time.perf_counter() - t0
    return cmp
