"""The one interface every backend implements, so the runner and comparison never branch on it.

A backend is built for one manifest and one rank (a *loader* builds its artifacts; the backend is the
*runner*, a context manager). `run_segment(k, feeds)` runs segment `k` of that rank on named inputs and
returns its named outputs, as torch tensors on `device`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class RankBackend(Protocol):
    device: torch.device

    def run_segment(self, index: int, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run segment `index` of this rank; `feeds` holds exactly the segment's input names."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...

    def __enter__(self) -> RankBackend: ...

    def __exit__(self, *exc: object) -> None: ...
