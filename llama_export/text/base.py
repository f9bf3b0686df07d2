"""The one tokenizer interface the runner uses, whatever the format."""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from typing import TypedDict

from llama_export.errors import InputError


class TokenizerFormat(str, enum.Enum):
    """How a tokenizer file is encoded (detected from its content, see `formats.detect_format`)."""

    SENTENCEPIECE = "sentencepiece"  # LLaMA 1/2 tokenizer.model (a protobuf)
    META_LLAMA3 = "meta-llama3"  # Meta Llama 3 tokenizer.model (tiktoken BPE ranks, base64 + rank lines)
    HF_TOKENIZERS = "hf-tokenizers"  # Hugging Face tokenizer.json


class Message(TypedDict):
    role: str  # "system", "user" or "assistant"
    content: str


def single_turn(user: str, *, system: str | None = None) -> list[Message]:
    """The conversation of `run --chat`: an optional system message, then the user's."""
    return ([Message(role="system", content=system)] if system is not None else []) + [
        Message(role="user", content=user)
    ]


class Tokenizer(abc.ABC):
    """Text <-> token ids with the conventions the model was trained with.

    `stop_ids`: generating any of these ends a row (the tokenizer's EOS, generation_config.json's
    eos_token_id, and for Meta Llama 3 <|end_of_text|>, <|eot_id|>, <|eom_id|>).
    """

    format: TokenizerFormat
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    generation = None  # the model's generation_config.json (`files.GenerationConfig`), if it has one

    def __init__(self, *, source: str) -> None:
        self.source = source  # where the files came from, for messages

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the model's convention adds to a prompt
        (BOS for LLaMA). Text that spells a special token is encoded as the format's reference does."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, special tokens included as text unless `skip_special` (what a reader of the
        generated text wants, as vLLM and OpenAI's API show it); an incomplete UTF-8 character at the
        end decodes to U+FFFD."""

    @property
    def max_token_bytes(self) -> int | None:
        """An upper bound on the UTF-8 bytes of input text that one token can stand for, or None where
        the format's normalization can shrink or drop text (then no such bound exists). Formats that
        know theirs override this, computing it once."""
        return None

    def check_fits(self, text: str, *, limit: int, limit_name: str) -> None:
        """InputError if `text` cannot fit a context of `limit` tokens with room for one new token, known
        before tokenizing it: N bytes are at least ceil(N / max_token_bytes) tokens. (Tokenizing 10 MB
        takes seconds and gigabytes, only to be refused.)"""
        bound = self.max_token_bytes
        n = len(text.encode("utf-8", "surrogatepass"))
        if bound is not None and -(-n // bound) >= limit:
            raise InputError(
                f"the prompt ({n:,} bytes, so at least {-(-n // bound):,} tokens) exceeds the context limit "
                f"{limit_name}; shorten it")

    @property
    def has_chat_template(self) -> bool:
        return False

    def _chat(self, messages: Sequence[Message]) -> list[int]:
        raise NotImplementedError

    def chat(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids of a conversation in the model's chat format, ending with the opening of the
        assistant's reply (transformers' `apply_chat_template(..., add_generation_prompt=True)`)."""
        if not self.has_chat_template:
            raise InputError(
                f"{self.source} has no chat template ({self.format.value} tokenizer without a chat_template in "
                "tokenizer_config.json or chat_template.jinja); use --prompt, or add the model's chat template"
            )
        return self._chat(messages)

    def until_stop(self, ids: Sequence[int]) -> list[int]:
        """`ids` cut before the first stop token (the reply without its end marker)."""
        out = []
        for i in ids:
            if i in self.stop_ids:
                break
            out.append(i)
        return out
