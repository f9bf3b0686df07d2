"""The built-in demo model: a small LLaMA trained on the Python standard library's own source.

`DEMO_DIR` holds a Meta-format checkpoint (`params.json`, fp16 `consolidated.00.pth`), its
sentencepiece `tokenizer.model`, and `MODEL_CARD.md` (corpus, training, samples, and the exact
`scripts/train_demo.py` command that retrains it).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent

__all__ = ["DEMO_DIR"]
