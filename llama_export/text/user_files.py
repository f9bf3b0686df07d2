"""Text files a user hands to a command: `run --batch` (one prompt per line) and `eval --text`.

Read as UTF-8, with a byte order mark at the start dropped (Windows editors write one; it is not text),
and every problem one line naming the file.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from llama_export.errors import InputError


def read_user_text(path: Path, what: str) -> str:
    """The text of `path` (`what` names the option in messages: "--text")."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read it ({e.strerror}); check the path") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:  # the byte's offset in the file, BOM included
        raise InputError(f"{what} {path} is not UTF-8 text (byte {bom + e.start}); save it as UTF-8") from None


def read_batch(path: Path, what: str = "--batch") -> tuple[str, ...]:
    """One prompt per line, `\\n` in a line standing for a newline. The file may end with a newline; a
    blank line (also a last one after that newline) is refused, not skipped: skipping it would renumber
    every later row."""
    lines = read_user_text(path, what).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{what} {path}: line {n} is blank; give one prompt per line (write \\n for a newline "
                             "inside a prompt) and remove the blank line")
    if not lines:
        raise InputError(f"{what} {path} is empty; give one prompt per line")
    return tuple(line.replace("\\n", "\n") for line in lines)
