"""LLaMA 1/2 sentencepiece `tokenizer.model` (behaviour unchanged from the first runner)."""

from __future__ import annotations

import functools
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

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """From the model's pieces, where the normalizer keeps every input byte: identity normalization
        (no character map), extra whitespace kept, byte fallback on (no <unk> swallowing unknown text).
        A piece's '▁' stands for one space byte; a byte piece for one byte; control pieces never come
        from text."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        norm = proto.normalizer_spec
        if norm.name != "identity" or norm.precompiled_charsmap or norm.remove_extra_whitespaces \
                or not proto.trainer_spec.byte_fallback:
            return None
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        return max([1] + [len(p.piece.replace("\u2581", " ").encode("utf-8")) for p in proto.pieces
                          if p.type in (kinds.NORMAL, kinds.USER_DEFINED)])

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
