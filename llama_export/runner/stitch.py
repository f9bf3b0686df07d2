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

    kv_spec = next(s for s in segments[0].inputs + sum((x.inputs for x in segments), ())
                   if s.name == "past_key_0")
    dtype = _TORCH_DTYPES[kv_spec.dtype]
    local_kv = int(kv_spec.shape[1])
    shape = (batch, local_kv, 0, cfg.head_dim)
    cache = ([torch.zeros(shape, dtype=dtype, device=backend.device) for _ in range(n)],
             [torch.zeros(shape, dtype=dtype, device=backend.device) for _ in range(n)])
    return step, cache, cfg
