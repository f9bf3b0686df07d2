"""`run --batch` and `eval --text` files: a BOM is not text, a blank line is refused, bad UTF-8 is named."""

from __future__ import annotations

import pytest

from llama_export.errors import InputError
from llama_export.runner.source import ModelSource
from llama_export.config import Backend
from llama_export.text.user_files import read_batch, read_user_text


def test_a_bom_is_dropped_and_tokenizes_as_without(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfdef f():\\n  return 1\nclass A:\n")
    (tmp_path / "plain.txt").write_bytes(b"def f():\\n  return 1\nclass A:\n")
    assert read_batch(tmp_path / "bom.txt") == read_batch(tmp_path / "plain.txt") == ("def f():\n  return 1", "class A:")
    tok = ModelSource(Backend.EAGER).resolve().tokenizer  # the demo model's
    assert tok.encode(read_user_text(tmp_path / "bom.txt", "--text")) == tok.encode(
        read_user_text(tmp_path / "plain.txt", "--text"))
    assert read_user_text(tmp_path / "bom.txt", "--text").startswith("def")


@pytest.mark.parametrize("data,line", [(b"a\n\nb\n", 2), (b"a\nb\n\n", 3), (b"\na\n", 1), (b"a\n  \t\nb", 2),
                                       (b"a\r\n\r\nb\r\n", 2)])
def test_a_blank_line_is_refused_with_its_number(tmp_path, data, line):
    (tmp_path / "p.txt").write_bytes(data)
    with pytest.raises(InputError, match=rf"--batch {tmp_path / 'p.txt'}: line {line} is blank"):
        read_batch(tmp_path / "p.txt")


def test_a_final_newline_is_fine_and_an_empty_file_is_refused(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a\nb\n")
    assert read_batch(tmp_path / "p.txt") == ("a", "b")
    (tmp_path / "p.txt").write_bytes(b"a\r\nb")
    assert read_batch(tmp_path / "p.txt") == ("a", "b")
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(InputError, match="is empty"):
        read_batch(tmp_path / "p.txt")


def test_bad_utf8_names_the_file_and_its_byte_offset_in_the_file(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfok \xff")
    with pytest.raises(InputError, match=rf"--text {tmp_path / 't.txt'} is not UTF-8 text \(byte 6\)"):
        read_user_text(tmp_path / "t.txt", "--text")
