"""Any Hugging Face fast tokenizer (`tokenizer.json`) through the `tokenizers` library, with the
conventions of transformers 5: special tokens and the chat template from tokenizer_config.json.

BOS/EOS on encode: what tokenizer.json's post-processor adds, nothing without one. Like transformers 5
(checked against 5.24), `add_bos_token`/`add_eos_token` in tokenizer_config.json are not consulted when a
tokenizer.json exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llama_export.errors import InputError
from llama_export.text.base import Message, Tokenizer, TokenizerFormat
from llama_export.text.chat import render_chat_template
from llama_export.text.files import TokenizerSettings


class HFTokenizer(Tokenizer):
    """`tokenizers.Tokenizer` plus tokenizer_config.json; chat through the jinja chat template."""

    format = TokenizerFormat.HF_TOKENIZERS

    def __init__(self, path: Path, settings: TokenizerSettings, *, extra_stop_ids: Sequence[int] = (),
                 source: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        super().__init__(source=source)
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise InputError(f"{path} is not a tokenizer.json the tokenizers library can read ({e}); "
                             "restore it from the original checkpoint") from None
        self.settings = settings
        self.bos_id = self._token_id("bos_token")
        self.eos_id = self._token_id("eos_token")
        self.stop_ids = frozenset(([self.eos_id] if self.eos_id is not None else []) + list(extra_stop_ids))

    def _token_id(self, name: str) -> int | None:
        text = self.settings.special_tokens.get(name)
        if text is None:
            return None
        i = self.tok.token_to_id(text)
        if i is None:
            raise InputError(f"{self.source}: {name} {text!r} is not in tokenizer.json's vocabulary; "
                             "the tokenizer files do not belong together")
        return i

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:
        return self.settings.chat_template is not None

    def chat_text(self, messages: Sequence[Message]) -> str:
        """The rendered chat template (before tokenization)."""
        return render_chat_template(self.settings.chat_template, messages,
                                    special_tokens=self.settings.special_tokens, source=self.source)

    def _chat(self, messages: Sequence[Message]) -> list[int]:
        # transformers tokenizes the rendered text without adding special tokens: the template has them.
        return self.encode(self.chat_text(messages), add_special_tokens=False)
