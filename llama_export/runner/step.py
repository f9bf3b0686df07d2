"""The step contract between a rank's model (eager or stitched segments) and whoever drives it.

A *step function* maps `(tokens [B, S], cache_lengths [B], token_lengths [B], keys, values)` to
`(logits [B, vocab] fp32, keys, values)` (`artifact/schema.py`: right-padded rows, a preallocated cache
written in place at per-row positions; a backend may return the same cache tensors). The eager model's
`Transformer.step` is one; a stitched sequence of exported segments is another (`runner.stitch`).

The driver is host-side numpy (ids, lengths, logits, sampling) and imports no torch, so that a run on
ONNX Runtime never loads it. A step function takes host int64 arrays and returns logits as a numpy array
or a torch tensor (`host`); the cache is whatever its backend allocated (numpy, torch, on any device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list, list], tuple[Any, list, list]]
# make_cache(batch, capacity) -> (keys, values): zeroed, shaped and typed as the step function wants
MakeCache = Callable[[int, int], tuple[list, list]]


def host(x: Any) -> np.ndarray:
    """A step's output as a host numpy array (a torch tensor on any device is copied over)."""
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()
