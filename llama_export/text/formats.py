"""Which tokenizer a file is, from its content, and loading the right one."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llama_export.errors import InputError
from llama_export.text.base import Tokenizer, TokenizerFormat
from llama_export.text.files import TOKENIZER_FILES, TextFiles, read_generation_config, read_tokenizer_settings

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def detect_format(data: bytes, *, source: str) -> TokenizerFormat:
    """HF tokenizer.json (a JSON object with a "model"), Meta Llama 3 tiktoken ranks (every line
    `base64 rank`) or a sentencepiece model (a protobuf sentencepiece accepts); anything else is refused."""
    head = data.lstrip()[:1]
    if head == b"{":
        try:
            if isinstance(obj := json.loads(data), dict) and "model" in obj:
                return TokenizerFormat.HF_TOKENIZERS
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    lines = [line for line in data.splitlines() if line.strip()]
    if lines and all(_TIKTOKEN_LINE.fullmatch(line.strip()) for line in lines):
        return TokenizerFormat.META_LLAMA3
    if head and head != b"{":
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_proto=data)
            return TokenizerFormat.SENTENCEPIECE
        except (RuntimeError, TypeError, OSError):
            pass
    raise InputError(
        f"{source} is not a tokenizer this tool reads (a sentencepiece model, a Meta Llama 3 tiktoken file or a "
        "Hugging Face tokenizer.json); restore the model's original tokenizer file or use --prompt-ids"
    )


def load_tokenizer(files: TextFiles, *, source: str) -> Tokenizer:
    """The tokenizer of a model from its text files (`files.text_files_in` of a checkpoint folder, or
    an export's recorded copies). `source` names where they are, for messages."""
    name = next((n for n in TOKENIZER_FILES if n in files), None)
    if name is None:
        raise InputError(f"{source} has no tokenizer.model or tokenizer.json; copy the model's tokenizer files "
                         "there or use --prompt-ids")
    path = Path(files[name])
    data = path.read_bytes()
    fmt = detect_format(data, source=str(path))
    generation = read_generation_config(files)
    tok = _tokenizer(fmt, path, data, files, stop=generation.eos_token_id if generation else (), source=source)
    tok.generation = generation
    return tok


def _tokenizer(fmt: TokenizerFormat, path: Path, data: bytes, files: TextFiles, *, stop: tuple[int, ...],
               source: str) -> Tokenizer:
    """The tokenizer class of `fmt`, built from its file (`data`, read from `path`)."""
    if fmt is TokenizerFormat.SENTENCEPIECE:
        from llama_export.text.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(data, extra_stop_ids=stop, source=source)
    if fmt is TokenizerFormat.META_LLAMA3:
        from llama_export.text.meta_llama3 import MetaLlama3Tokenizer

        return MetaLlama3Tokenizer(data, extra_stop_ids=stop, source=source, name=path.name)
    from llama_export.text.hf import HFTokenizer

    return HFTokenizer(path, read_tokenizer_settings(files), extra_stop_ids=stop, source=source)
