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

from llama_export import dtypes
from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest
from llama_export.backends.base import RankBackend
from llama_export.parallel.comm import Communicator
from llama_export.runner.generate import StepFn

# Called after every segment with (segment index, the environment so far).
SegmentHook = Callable[[int, dict[str, Tensor]], None]



def segmented_step(manifest: Manifest, backend: RankBackend, *, comm: Communicator,
                   hook: SegmentHook | None = None) -> StepFn:
    """The step function of this rank's segments."""
    n = manifest.model.n_layers
    segments = manifest.rank(comm.rank).segments

    def step(tokens: Tensor, past_keys: list[Tensor], past_values: list[Tensor]):
        env: dict[str, Tensor] = {schema.TOKENS: tokens}
        env.update({schema.past_key(i): t for i, t in enumerate(past_keys)})
        env.update({schema.past_value(i): t for i, t in enumerate(past_values)})
        for k, seg in enumerate(segments):
            env.update(backend.run_segment(k, {s.name: env[s.name] for s in seg.inputs}))
            c = seg.collective
            if c is not None:
                if c.op == schema.ALL_REDUCE:
                    env[c.output] = comm.all_reduce(env[c.input])
                elif c.op == schema.ALL_GATHER:
                    env[c.output] = comm.all_gather(env[c.input], dim=c.axis)
                else:
                    raise ValueError(f"unknown collective {c.op!r} in the manifest")
            if hook is not None:
                hook(k, env)
        return (env[schema.LOGITS], [env[schema.present_key(i)] for i in range(n)],
                [env[schema.present_value(i)] for i in range(n)])

    return step


def empty_cache(manifest: Manifest, rank: int, batch: int, *,
                device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Zero-length past keys/values for a prefill of `batch` rows, shaped and typed as the graphs say."""
    spec = next(s for seg in manifest.rank(rank).segments for s in seg.inputs if s.name == schema.past_key(0))
    shape = (batch, int(spec.shape[1]), 0, manifest.model.head_dim)
    dtype = dtypes.by_name(spec.dtype).torch
    n = manifest.model.n_layers
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])
