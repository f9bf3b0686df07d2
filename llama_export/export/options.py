"""What one export is asked to produce (`ExportOptions`): a module of its own, without torch, so that
the CLI reads its defaults and refuses bad arguments before the exporter is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_export.config import ModelDType, Precision, WeightQuant
from llama_export.gguf_file import checkpoint_name


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    out: Path = Path("graphs")
    tp: int = 1
    dtype: Precision = Precision.FP32  # activations (and weights, unless `weights` quantizes them)
    weights: WeightQuant | None = None
    model_name: str | None = None  # default: the checkpoint folder's name (a GGUF file's, without .gguf)
    max_batch: int = 8
    max_seq_len: int | None = None  # default: the checkpoint's
    progress: bool = True

    @property
    def variant(self) -> str:
        return f"tp{self.tp}-{ModelDType(self.dtype, self.weights)}"

    @property
    def name(self) -> str:
        """The model's folder name under `out`."""
        return self.model_name or checkpoint_name(self.checkpoint)

    @property
    def target(self) -> Path:
        """Where the export goes: `<out>/<name>/<variant>`."""
        return Path(self.out) / self.name / self.variant
