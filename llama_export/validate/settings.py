"""How long a comparison runs and on what prompt (`CompareSettings`; `VALIDATION`, the export
check's): without torch, so that the CLI reads the defaults before the comparison engine is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llama_export.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class CompareSettings:
    """The prompt and length of a comparison (the CLI's defaults come from here)."""

    steps: int = 8  # greedy decode steps after the prefill
    batch: int = 1  # rows of the random prompt
    prompt_len: int = 8  # tokens of the random prompt
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "prompt_len"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1")

    def random_prompt(self, vocab_size: int) -> Tensor:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, vocab_size, (self.batch, self.prompt_len), generator=g)


# Export validation: two rows of five tokens (batch and sequence dimensions both exercised).
VALIDATION = CompareSettings(batch=2, prompt_len=5)
