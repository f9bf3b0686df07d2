"""Comparison results: objects that are truthy on pass and say where the error is largest (judged by
`llama_export.tolerances`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def nan_worst(values: Iterable[float], pick=max, *, default: float) -> float:
    """`pick` (max or min) of `values`, or NaN if any is NaN: Python's max/min silently skip a NaN
    depending on where it stands in the list, and a NaN error is the worst error of all."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else pick(values, default=default)


def nan_first(error: float) -> tuple[bool, float]:
    """Sort key of an error for max(): NaN ranks above every number."""
    return (math.isnan(error), error)


@dataclass(frozen=True)
class TensorDiff:
    """How far `actual` is from `expected` for one named tensor."""

    name: str
    max_abs: float
    mean_abs: float
    cosine: float
    top1: float | None = None  # fraction of rows whose argmax agrees (logits only)
    top5: float | None = None  # mean overlap of the top-5 sets (logits only)

    @classmethod
    def of(cls, name: str, actual: Tensor, expected: Tensor, *, logits: bool = False) -> TensorDiff:
        # numpy (ONNX Runtime's arrays) or torch on any device; compared as fp32 CPU tensors
        a, e = (torch.as_tensor(t).detach().float().cpu() for t in (actual, expected))
        if a.shape != e.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
        d = (a - e).abs()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0, eps=1e-12).item() \
            if a.numel() else 1.0
        top1 = top5 = None
        if logits and a.numel():
            a2, e2 = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
            top1 = (a2.argmax(-1) == e2.argmax(-1)).float().mean().item()
            k = min(5, a2.shape[-1])
            ta, te = a2.topk(k, -1).indices, e2.topk(k, -1).indices
            top5 = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, te)) / (k * len(ta))
        return cls(name, d.max().item() if d.numel() else 0.0, d.mean().item() if d.numel() else 0.0, cos, top1, top5)


@dataclass
class Comparison:
    """Per-tensor diffs of a backend against eager, judged on the final logits."""

    label: str
    tolerance: float
    logits: list[TensorDiff] = field(default_factory=list)  # one per generation step
    tokens_agree: float = 1.0  # fraction of greedy steps whose token matches eager
    seconds: float = 0.0

    @property
    def max_abs(self) -> float:
        return nan_worst((d.max_abs for d in self.logits), default=0.0)

    @property
    def min_cosine(self) -> float:
        return nan_worst((d.cosine for d in self.logits), min, default=1.0)

    @property
    def top1(self) -> float:
        vals = [d.top1 for d in self.logits if d.top1 is not None]
        return sum(vals) / len(vals) if vals else 1.0

    def __bool__(self) -> bool:
        return self.max_abs <= self.tolerance and self.tokens_agree == 1.0  # False for a NaN max_abs

    def worst(self) -> TensorDiff | None:
        return max(self.logits, key=lambda d: nan_first(d.max_abs), default=None)

    def __str__(self) -> str:
        status = "PASS" if self else "FAIL"
        w = self.worst()
        where = f" (worst: {w.name})" if w else ""
        return (f"{status} {self.label}: max abs {self.max_abs:.2e} <= {self.tolerance:.0e}? cosine "
                f"{self.min_cosine:.6f}, top-1 {self.top1:.3f}, greedy tokens {self.tokens_agree:.3f}{where}")
