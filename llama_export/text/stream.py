"""Streaming text of a growing token sequence without ever showing half a character."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class TextStream:
    """Text deltas of generated ids: what `push` and `finish` return, joined, equals `decode(all ids)`.

    Byte-level BPE (Llama 3) and byte-fallback sentencepiece split a multi-byte UTF-8 character over
    several tokens; the tokenizer decodes the unfinished bytes to U+FFFD. Text is therefore released only
    while the decoded sequence does not end in U+FFFD (a real U+FFFD comes out with the next character or
    at `finish`). Each push decodes the whole sequence again (microseconds for the lengths these models
    generate), which keeps this correct for any decoder whose text only grows at the end.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._shown = ""

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; return the text that is now complete."""
        self._ids.extend(ids)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT) or not text.startswith(self._shown):
            return ""
        return self._release(text)

    def finish(self) -> str:
        """The rest of the text (an unfinished character at the very end comes out as U+FFFD)."""
        text = self._decode(self._ids)
        if not text.startswith(self._shown):
            log.warning("the tokenizer's decode changed text it had already produced; the stream differs from "
                        "the final text")
            return ""
        return self._release(text)

    def _release(self, text: str) -> str:
        delta, self._shown = text[len(self._shown):], text
        return delta
