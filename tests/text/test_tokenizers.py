"""Tokenizers of every LLaMA generation against their independent references: transformers (HF format),
tiktoken's own loader (Meta format), sentencepiece (LLaMA 1/2, the demo model)."""

from __future__ import annotations

import json

import pytest

from llama_export.demo import DEMO_DIR
from llama_export.errors import InputError
from llama_export.text import TextStream, TokenizerFormat, detect_format, load_tokenizer, single_turn, text_files_in
from llama_export.text.meta_llama3 import LLAMA3_PATTERN, SPECIAL_TOKENS, _meta_pieces
from tests.llama3_text import CORPUS, N_BASE, special_id, write_hf_files, write_meta_tokenizer

TEXTS = CORPUS[:7] + [
    "Hello, wörld! 🤖 12345678 x", "  leading spaces\n\n\ntrailing  ", "ÿÿÿ ☃☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "unseen words: zyxwvut quokka", "a", " ",
]
UNICODE = "Ça va? Très bien 😀🎉 — naïve façade, 你好，世界 👍🏽 ❤️ Straße"
EXTRA_EOS = 300  # an ordinary token id that only generation_config.json names as an eos


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    eos = [special_id("<|end_of_text|>"), special_id("<|eot_id|>"), EXTRA_EOS]
    hf = write_hf_files(root / "hf", generation_eos=eos)
    write_meta_tokenizer(root / "meta")
    return {"hf": hf, "meta": root / "meta"}


@pytest.fixture(scope="module")
def reference(folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders["hf"])


def _load(folder):
    return load_tokenizer(text_files_in(folder), source=str(folder))


def test_formats_are_detected_by_content_not_name(folders, tmp_path):
    sp = (DEMO_DIR / "tokenizer.model").read_bytes()
    meta = (folders["meta"] / "tokenizer.model").read_bytes()
    hf = (folders["hf"] / "tokenizer.json").read_bytes()
    assert detect_format(sp, source="x") is TokenizerFormat.SENTENCEPIECE
    assert detect_format(meta, source="x") is TokenizerFormat.META_LLAMA3
    assert detect_format(hf, source="x") is TokenizerFormat.HF_TOKENIZERS
    # An HF tokenizer.json saved as tokenizer.model is still read as one.
    (tmp_path / "tokenizer.model").write_bytes(hf)
    assert _load(tmp_path).format is TokenizerFormat.HF_TOKENIZERS


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x0a\x05junk\xff\xfe", b'{"not": "a tokenizer"}',
                                     b"aGVsbG8= 0\nnot base64 line\n"])
def test_unrecognised_tokenizer_model_is_refused(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(InputError, match="is not a tokenizer this tool reads .* or use --prompt-ids"):
        _load(tmp_path)


def test_missing_tokenizer_suggests_prompt_ids(tmp_path):
    with pytest.raises(InputError, match="has no tokenizer.model or tokenizer.json; .* use --prompt-ids"):
        _load(tmp_path)


def test_tiktoken_ranks_with_gaps_are_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(InputError, match="ranks are not 0..1"):
        _load(tmp_path)


def test_hf_prompt_ids_equal_transformers(folders, reference):
    tok = _load(folders["hf"])
    texts = TEXTS + ["special text <|eot_id|> inside", UNICODE]
    for text in texts:
        assert tok.encode(text) == reference(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]
    assert tok.bos_id == reference.bos_token_id == special_id("<|begin_of_text|>")
    assert tok.eos_id == reference.eos_token_id
    assert tok.decode(tok.encode(UNICODE, add_special_tokens=False)) == UNICODE


def test_meta_prompt_ids_equal_tiktoken_and_hf(folders, reference):
    """The Meta file through tiktoken's own loader with Meta's layout, and the same merges through the
    tokenizers library (transformers), give the same ids."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    tok = _load(folders["meta"])
    assert tok.format is TokenizerFormat.META_LLAMA3
    ranks = load_tiktoken_bpe(str(folders["meta"] / "tokenizer.model"), expected_hash=None)
    assert len(ranks) == N_BASE
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for text in TEXTS + [UNICODE]:
        assert tok.encode(text) == [tok.bos_id] + enc.encode(text, disallowed_special=()), text
        assert tok.encode(text) == reference(text)["input_ids"], text
    # Meta encodes special-token text in a prompt as plain text.
    assert tok.encode("<|eot_id|>", add_special_tokens=False) == enc.encode("<|eot_id|>", disallowed_special=())
    assert tok.decode(tok.encode(UNICODE, add_special_tokens=False)) == UNICODE


def test_meta_special_token_layout():
    """Ids as in Meta's tokenizer.py: 256 tokens after the BPE ranks, named ones at fixed offsets."""
    assert len(SPECIAL_TOKENS) == 256 == len(set(SPECIAL_TOKENS))
    offsets = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7,
               "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10}
    assert {t: SPECIAL_TOKENS.index(t) for t in offsets} == offsets
    assert SPECIAL_TOKENS[2] == "<|reserved_special_token_0|>" and SPECIAL_TOKENS[-1] == "<|reserved_special_token_245|>"


def test_meta_cuts_long_runs_like_meta():
    """Meta splits inputs so that no run of (non-)whitespace exceeds 25,000 characters."""
    text = "a" * 25_001 + "   b"
    assert list(_meta_pieces(text)) == ["a" * 25_000, "a   b"]
    assert list(_meta_pieces("x y")) == ["x y"]


@pytest.mark.parametrize("system", [None, "  You answer in one word.  "])
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_chat_ids_equal_apply_chat_template(folders, reference, fmt, system):
    tok = _load(folders[fmt])
    for user in ["Hi!", "  Ça va? 😀 \n", "Two\n\nparagraphs."]:
        messages = single_turn(user, system=system)
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        assert tok.chat(messages) == expected, (fmt, user)


def test_template_features_render_as_transformers(tmp_path):
    """Globals, filters, extensions and whitespace control of transformers' environment."""
    from transformers import AutoTokenizer

    template = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{{ bos_token }}{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "[{{ m['role'] }} {{ ns.n }}] {{ m | tojson }} {{ dict(a=1) | tojson }}\n"
        "    {% if loop.index > 5 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{% generation %}year {{ strftime_now('%Y') }}{% endgeneration %}\n"
        "{% if tools is none and documents is none and add_generation_prompt %}<assistant>{% endif %}"
        "{{ eos_token }}"
    )
    write_hf_files(tmp_path, chat_template=template)
    messages = single_turn("naïve <b>&</b> 😀", system="hidden")
    ref = AutoTokenizer.from_pretrained(tmp_path)
    tok = _load(tmp_path)
    assert tok.chat_text(messages) == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_chat_template_file_wins_and_named_templates(tmp_path):
    write_hf_files(tmp_path, chat_template=[{"name": "tool_use", "template": "T"},
                                            {"name": "default", "template": "D{{ messages[0]['content'] }}"}])
    assert _load(tmp_path).chat_text(single_turn("x")) == "Dx"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert _load(tmp_path).chat_text(single_turn("x")) == "Jx"


@pytest.mark.parametrize("template,match", [
    ("{{ raise_exception('only user/assistant roles') }}", "failed to render: only user/assistant roles"),
    ("{% for m in messages %}", "has a syntax error"),
    ("{{ messages.__class__.__mro__ }}", "failed to render"),
    ("{% set ns = namespace(_x=1) %}", "failed to render"),
])
def test_template_errors_are_one_line(tmp_path, template, match):
    write_hf_files(tmp_path, chat_template=template)
    with pytest.raises(InputError, match=match) as e:
        _load(tmp_path).chat(single_turn("hi"))
    assert "\n" not in str(e.value)


def test_no_chat_template_is_a_clear_error(tmp_path):
    write_hf_files(tmp_path, chat_template=None)
    with pytest.raises(InputError, match="has no chat template .* use --prompt"):
        _load(tmp_path).chat(single_turn("hi"))
    with pytest.raises(InputError, match="has no chat template"):
        _load(DEMO_DIR).chat(single_turn("hi"))


def test_stop_ids(folders, tmp_path):
    hf, meta = _load(folders["hf"]), _load(folders["meta"])
    eot, eom, end = special_id("<|eot_id|>"), special_id("<|eom_id|>"), special_id("<|end_of_text|>")
    assert hf.stop_ids == {eot, end, EXTRA_EOS}  # tokenizer eos <|eot_id|> + generation_config.json's list
    assert meta.stop_ids == {end, eot, eom}
    assert _load(DEMO_DIR).stop_ids == {2}
    write_hf_files(tmp_path, generation_eos=EXTRA_EOS)  # an int, not a list
    assert _load(tmp_path).stop_ids == {eot, EXTRA_EOS}
    assert hf.until_stop([5, 6, EXTRA_EOS, 7]) == [5, 6]


@pytest.mark.parametrize("value", ['"2"', "[1, -3]", "true"])
def test_bad_generation_config_is_refused(tmp_path, value):
    write_hf_files(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": %s}' % value)
    with pytest.raises(InputError, match="generation_config.json: eos_token_id=.* must be a token id"):
        _load(tmp_path)


@pytest.mark.parametrize("fmt", ["hf", "meta", "demo"])
def test_streaming_never_shows_half_a_character(folders, fmt):
    tok = _load(DEMO_DIR if fmt == "demo" else folders[fmt])
    text = UNICODE if fmt != "demo" else 'x = "é😀ü"  # Ça'
    ids = tok.encode(text, add_special_tokens=False)
    # The test means something only if some tokens end inside a character.
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    stream = TextStream(tok.decode)
    deltas = [stream.push([i]) for i in ids] + [stream.finish()]
    assert not any("\ufffd" in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == text


def test_stream_flushes_a_trailing_partial_character(folders):
    tok = _load(folders["meta"])
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    stream = TextStream(tok.decode)
    assert [stream.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.finish() == tok.decode(ids[:-1])  # what decode gives, U+FFFD included


def test_sentencepiece_unchanged():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / "tokenizer.model"))
    tok = _load(DEMO_DIR)
    assert tok.format is TokenizerFormat.SENTENCEPIECE
    for text in ["def ", "class Parser:\n    pass", "é"]:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("") == []
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())


def test_special_tokens_from_special_tokens_map(tmp_path):
    """Without tokens in tokenizer_config.json, special_tokens_map.json names them (as in transformers)."""
    write_hf_files(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|end_of_text|>"}}))
    assert _load(tmp_path).eos_id == special_id("<|end_of_text|>")


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_decode_skipping_special_tokens_equals_transformers(folders, reference, fmt):
    """Generated text as a reader sees it: special tokens (BOS, headers, reserved ones) left out, as
    transformers' decode(..., skip_special_tokens=True) does."""
    tok = _load(folders[fmt])
    ids = reference.apply_chat_template(single_turn("Hi 😀", system="Be brief."), add_generation_prompt=True,
                                        return_dict=False) + reference.encode(UNICODE, add_special_tokens=False) + \
        [special_id("<|reserved_special_token_226|>"), special_id("<|eot_id|>")]
    assert tok.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True)
    assert "<|reserved_special_token_226|>" in tok.decode(ids) and "<|" not in tok.decode(ids, skip_special=True)


def test_sentencepiece_decode_skipping_special_tokens():
    tok = _load(DEMO_DIR)
    ids = [tok.bos_id, *tok.encode("def f():", add_special_tokens=False), tok.eos_id]
    assert tok.decode(ids, skip_special=True) == "def f():"
