"""Stitch a rank's exported segments into one step function, running the collectives between them.

    env = {tokens, cache_lengths, token_lengths, past_key_*, past_value_*}
    for segment k:  env |= backend.run_segment(k, env[inputs of k])
                    if a collective follows: env[its output] = all_reduce / all_gather(env[its input])
    return env[logits], env[present_key_*], env[present_value_*]

Backends write present_* into the past_* buffers where they can (the step then returns the cache
tensors it was given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest
from llama_export.backends.base import RankBackend
from llama_export.config import Backend
from llama_export.parallel.comm import Communicator
from llama_export.runner.step import StepFn

# Called after every segment with (segment index, the environment so far).
SegmentHook = Callable[[int, dict[str, Any]], None]


def segmented_step(manifest: Manifest, backend: RankBackend, *, comm: Communicator,
                   hook: SegmentHook | None = None) -> StepFn:
    """The step function of this rank's segments."""
    n = manifest.model.n_layers
    segments = manifest.rank(comm.rank).segments

    def step(tokens, cache_lengths, token_lengths, keys: list, values: list):
        env: dict[str, Any] = {schema.TOKENS: tokens, schema.CACHE_LENGTHS: cache_lengths,
                               schema.TOKEN_LENGTHS: token_lengths}
        env.update({schema.past_key(i): t for i, t in enumerate(keys)})
        env.update({schema.past_value(i): t for i, t in enumerate(values)})
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


def empty_cache(manifest: Manifest, rank: int, batch: int, capacity: int, *,
                backend: RankBackend) -> tuple[list, list]:
    """Zeroed keys/values `[batch, kv_heads, capacity, head_dim]` for `batch` rows, typed as the graphs
    say, in `backend`'s own buffers (`RankBackend.zeros`)."""
    spec = next(s for seg in manifest.rank(rank).segments for s in seg.inputs if s.name == schema.past_key(0))
    shape = (batch, int(spec.shape[1]), capacity, manifest.model.head_dim)
    n = manifest.model.n_layers
    return ([backend.zeros(shape, spec.dtype) for _ in range(n)],
            [backend.zeros(shape, spec.dtype) for _ in range(n)])


def backend_capacity(backend: Backend, manifest: Manifest, capacity: int) -> int:
    """The KV cache capacity to allocate for `backend` when `capacity` slots per row are enough: TensorRT
    engines take one static length, the max_seq_len of the manifest beside them (the build's --max-seq-len,
    `backends/tensorrt/profiles.py`); the other
    backends take `capacity`."""
    return manifest.model.max_seq_len if backend is Backend.TENSORRT else capacity
