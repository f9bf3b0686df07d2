"""LLaMA 1/2 sentencepiece `tokenizer.model` (behaviour unchanged from the first runner)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llama_export.text.base import Tokenizer, TokenizerFormat


class SentencePieceTokenizer(Tokenizer):
    """Sentencepiece with LLaMA conventions: BOS prepended to a non-empty prompt, EOS stops."""

    format = TokenizerFormat.SENTENCEPIECE

    def __init__(self, model: bytes, *, extra_stop_ids: Sequence[int] = (), source: str) -> None:
        import sentencepiece as spm

        super().__init__(source=source)
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.stop_ids = frozenset(([self.eos_id] if self.eos_id is not None else []) + list(extra_stop_ids))

    @classmethod
    def from_file(cls, path: Path, **kwargs) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), **kwargs)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        if not ids:
            return []
        return ([self.bos_id] if add_special_tokens and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if skip_special:  # control pieces (<s>, </s>) decode to nothing already; so do unused ones
            ids = [i for i in ids if not (self.sp.IsControl(i) or self.sp.IsUnused(i))]
        return self.sp.decode(list(ids))
