"""Stitch a rank's exported segments into one step function, running the collectives between them.

    env = {tokens, past_key_*, past_value_*}
    for segment k:  env |= backend.run_segment(k, env[inputs of k])
                    if a collective follows: env[its output] = all_reduce / all_gather(env[its input])
    return env[logits], env[present_key_*], env[present_value_*]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llama_export.backends.base import RankBackend
from llama_export.export.manifest import Manifest
from llama_export.export.schema import ALL_GATHER, ALL_REDUCE
from llama_export.parallel.comm import Communicator

# Called after every segment with (segment index, the environment so far).
SegmentHook = Callable[[int, dict[str, Tensor]], None]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def segmented_step(manifest: Manifest, backend: RankBackend, *, comm: Communicator, batch: int,
                   hook: SegmentHook | None = None):
    """(step function, empty KV cache, model config) for this rank's segments."""
    cfg = manifest.model
    n = cfg.n_layers
    segments = manifest.rank(comm.rank).segments

    def step(tokens: Tensor, past_keys: list[Tensor], past_values: list[Tensor]):
        env: dict[str, Tensor] = {"tokens": tokens}
        env.update({f"past_key_{i}": t for i, t in enumerate(past_keys)})
        env.update({f"past_value_{i}": t for i, t in enumerate(past_values)})
        for k, seg in enumerate(segments):
            env.update(backend.run_segment(k, {s.name: env[s.name] for s in seg.inputs}))
            c = seg.collective
            if c is not None:
                if c.op == ALL_REDUCE:
                    env[c.output] = comm.all_reduce(env[c.input])
                elif c.op == ALL_GATHER:
                    env[c.output] = comm.all_gather(env[c.input], dim=c.axis)
                else:
                    raise ValueError(f"unknown collective {c.op!r} in the manifest")
            if hook is not None:
                hook(k, env)
        return (env["logits"], [env[f"present_key_{i}"] for i in range(n)],
                [env[f"present_value_{i}"] for i in range(n)])

    return step, empty_cache(manifest, comm.rank, batch, device=backend.device), cfg


def empty_cache(manifest: Manifest, rank: int, batch: int, *,
                device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Zero-length past keys/values for a prefill of `batch` rows, shaped and typed as the graphs say."""
    spec = next(s for seg in manifest.rank(rank).segments for s in seg.inputs if s.name == "past_key_0")
    shape = (batch, int(spec.shape[1]), 0, manifest.model.head_dim)
    dtype = _TORCH_DTYPES[spec.dtype]
    n = manifest.model.n_layers
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])
