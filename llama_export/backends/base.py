"""The one interface every backend implements, so the runner and comparison never branch on it.

A backend is built for one manifest and one rank (a *loader* builds its artifacts; the backend is the
*runner*, a context manager). `run_segment(k, feeds)` runs segment `k` of that rank on named inputs and
returns its named outputs, as arrays of the backend's own kind (ONNX Runtime on CPU: numpy; TensorRT:
torch tensors on `device`). Feeds may be host arrays (numpy, CPU tensors: ids and lengths) or the
backend's own buffers (`zeros`, earlier outputs).
"""

from __future__ import annotations

from typing import Any, Protocol


class RankBackend(Protocol):
    device: str  # "cpu", "cuda:0"

    def run_segment(self, index: int, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run segment `index` of this rank; `feeds` holds exactly the segment's input names."""
        ...

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A zeroed buffer of `dtype` (numpy spelling, as the manifest's) where this backend computes:
        the KV cache."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...

    def __enter__(self) -> RankBackend: ...

    def __exit__(self, *exc: object) -> None: ...
