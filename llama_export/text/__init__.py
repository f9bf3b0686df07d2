"""Text in and out: tokenizers of every LLaMA generation, chat templates, stop tokens, streaming.

Depends only on `llama_export.config`/`errors` and the tokenizer libraries (sentencepiece, tiktoken,
tokenizers, jinja2), each imported when a tokenizer of its kind is loaded.
"""

from llama_export.text.base import Message, Tokenizer, TokenizerFormat, single_turn
from llama_export.text.files import TEXT_FILES, TextFiles, text_files_in
from llama_export.text.formats import detect_format, load_tokenizer
from llama_export.text.stream import TextStream

__all__ = [
    "Message", "TEXT_FILES", "TextFiles", "TextStream", "Tokenizer", "TokenizerFormat", "detect_format",
    "load_tokenizer", "single_turn", "text_files_in",
]
