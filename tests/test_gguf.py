"""GGUF checkpoints against independent references: transformers' own GGUF loading (weights, logits,
tokenizer, chat template) and gguf-py's dequantization of whole tensors (our slices of them).

Tolerance (fp32): logits within TOLERANCES[fp32].logits_atol of transformers' (both dequantize the same
blocks to the same floats; the kernels differ).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_export.config import ModelConfig, Precision, RopeScaling
from llama_export.errors import CheckpointError
from llama_export.model.checkpoint import build_model, expected_shapes, load_config
from llama_export.tolerances import TOLERANCES
from tests import llama3_text as l3
from tests.gguf_helpers import llama3_rope_factors, write_gguf
from tests.helpers import lengths, random_meta_state

ATOL = TOLERANCES[Precision.FP32].logits_atol
# GQA (n_kv_heads < n_heads, so q and k permute with different head counts); rows a multiple of 32
# so that every 2-D weight takes the legacy block types
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=l3.VOCAB, hidden_dim=192,
                  max_seq_len=64, rope_theta=500000.0)
LEGACY = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def add_llama3_tokenizer(w) -> None:
    """The small Llama-3-style tokenizer (tests/llama3_text.py) as llama.cpp writes one: llama-bpe."""
    spec = json.loads(l3.trained_tokenizer_json())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [a["content"] for a in sorted(spec["added_tokens"], key=lambda a: a["id"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * l3.N_BASE + [3] * (len(tokens) - l3.N_BASE))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(l3.special_id("<|begin_of_text|>"))
    w.add_eos_token_id(l3.special_id("<|eot_id|>"))
    w.add_add_bos_token(True)
    w.add_chat_template(l3.LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def state():
    return random_meta_state(CFG, seed=1)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, state):
    """qtype -> (folder, file name) of the model written in that type."""
    out = {}
    for q in LEGACY:
        d = tmp_path_factory.mktemp(q)
        out[q] = write_gguf(d / f"tiny-{q}.gguf", CFG, state, qtype=q, tokenizer=add_llama3_tokenizer)
    return out


def _transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_config_from_metadata(ggufs):
    got = load_config(ggufs["F32"])
    # the file holds rms epsilon as float32
    assert got == dataclasses.replace(CFG, norm_eps=float(np.float32(CFG.norm_eps)))
    assert load_config(ggufs["F32"].parent) == got  # a folder holding one .gguf


def test_qk_rows_are_meta_order(ggufs, state):
    """The file went Meta -> HF -> llama.cpp's permute; read back it is Meta's layout again, exactly."""
    model = build_model(ggufs["F32"])
    wqkv = model.state_dict()["layers.1.attention.wqkv.weight"]
    q, k, _ = wqkv.split([CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim])
    assert torch.equal(q, state["layers.1.attention.wq.weight"])
    assert torch.equal(k, state["layers.1.attention.wk.weight"])


@pytest.mark.parametrize("qtype", LEGACY)
def test_logits_match_transformers(ggufs, qtype):
    path = ggufs[qtype]
    model, ref = build_model(path), _transformers(path)
    seq = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    keys, values = model.empty_cache(2, 12)
    tokens = seq
    with torch.no_grad():
        for step in range(3):  # prefill, then two decode steps through the cache
            logits, keys, values = model(tokens, lengths(2, seq.shape[1] - tokens.shape[1]), lengths(2, tokens.shape[1]),
                                         keys, values)
            want = ref(seq).logits[:, -1]
            err = (logits - want).abs().max().item()
            assert err <= ATOL, f"{qtype} step {step}: max abs error {err:.2e}"
            assert want.std() > 0.1
            tokens = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, tokens], dim=1)


def test_tied_embeddings(tmp_path, state):
    """No output.weight: the output projection is the embedding (llama.cpp's rule), as transformers does."""
    path = write_gguf(tmp_path / "tied.gguf", CFG, state, qtype="Q8_0", tied=True, tokenizer=add_llama3_tokenizer)
    assert load_config(path).tie_word_embeddings
    model, ref = build_model(path), _transformers(path)
    sd = model.state_dict()
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    seq = torch.randint(0, CFG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(seq, lengths(1, 0), lengths(1, 5), *model.empty_cache(1))[0]
        assert (got - ref(seq).logits[:, -1]).abs().max().item() <= ATOL


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"])
def test_rank_slices_equal_whole_dequantization(tmp_path, qtype):
    """Any row or column slice read from the file equals that slice of gguf-py's dequantization of the
    whole tensor (K-quants, which gguf-py cannot quantize, as random blocks; a NaN scale stays NaN)."""
    import gguf

    from llama_export.gguf_file import open_gguf
    from llama_export.model.gguf_format import GGUFReader
    from llama_export.parallel.plan import Slice

    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows, cols = 6, 512
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    if qtype == "F16":  # finite halves
        raw = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    cfg = dataclasses.replace(CFG, dim=cols, hidden_dim=rows, n_heads=8, n_kv_heads=8)
    name = "blk.0.ffn_gate.weight"

    def only(n, data):
        return (raw, qtype) if n == name else (data, "F32")
    path = write_gguf(tmp_path / "r.gguf", cfg, random_meta_state(cfg), tensor=only)
    with np.errstate(all="ignore"):  # random scales may be NaN or infinite: they must stay so
        whole = gguf.quants.dequantize(raw, t)
    with GGUFReader(open_gguf(path), expected_shapes(cfg)) as reader, np.errstate(all="ignore"):
        for sl, want in [(Slice(0, 2, 5), whole[2:5]), (Slice(1, 256, 512), whole[:, 256:]),
                         (Slice(1, 100, 300), whole[:, 100:300]), (Slice(None), whole)]:
            got = reader.read("layers.0.feed_forward.w1.weight", sl).float().numpy()
            np.testing.assert_array_equal(got, want)


def test_llama31_rope_freqs(tmp_path, state):
    """rope_freqs.weight as llama.cpp's converter computes it becomes Meta's Llama-3.1 scaling; factors
    from other numbers are refused."""
    hd = CFG.head_dim
    path = write_gguf(tmp_path / "a.gguf", CFG, state, rope_freqs=llama3_rope_factors(hd, CFG.rope_theta))
    assert load_config(path).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    odd = write_gguf(tmp_path / "b.gguf", CFG, state, rope_freqs=llama3_rope_factors(hd, CFG.rope_theta, high=2.0))
    with pytest.raises(CheckpointError, match="not Llama-3.1 scaling"):
        load_config(odd)


def test_tokenizer_and_chat_template_match_transformers(ggufs):
    """The text files built from the metadata: the ids of the original tokenizer.json and of
    transformers' GGUF tokenizer, special tokens whole, BOS added as the file says, the chat template."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    from llama_export.text import load_tokenizer, text_files_in

    path = ggufs["Q8_0"]
    files = text_files_in(path)
    tok = load_tokenizer(files, source=str(path))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original = RustTokenizer.from_str(l3.trained_tokenizer_json())
    texts = [*l3.CORPUS, "<|start_header_id|>user<|end_header_id|>\n\nhi 12345<|eot_id|>", "  two  spaces\n\n\ttab"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"] == original.encode(text).ids, text
        assert tok.decode(ids, skip_special=True) == original.decode(ids)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert tok.chat(msgs) == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert tok.stop_ids == {l3.special_id("<|eot_id|>")}


def test_export_validates_on_onnxruntime_and_carries_the_tokenizer(tmp_path, ggufs):
    """A quantized GGUF exported at tp=2 (column slices of blocks) and run on ONNX Runtime equals the
    eager model (the export's own validation); the export carries the GGUF's tokenizer and template."""
    from llama_export.config import Backend
    from llama_export.export.exporter import ExportOptions, export
    from llama_export.runner.source import ModelSource
    from llama_export.validate.compare import validate_export

    out = export(ExportOptions(checkpoint=ggufs["Q4_1"], out=tmp_path / "graphs", tp=2, progress=False))
    assert out == tmp_path / "graphs" / "tiny-Q4_1" / "tp2-fp32"
    cmp = validate_export(out, ggufs["Q4_1"])
    assert cmp and cmp.tokens_agree, cmp
    exported = ModelSource(Backend.ORT, artifacts=out).resolve().tokenizer
    eager = ModelSource(Backend.EAGER, checkpoint=ggufs["Q4_1"]).resolve().tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    assert exported.chat(msgs) == eager.chat(msgs) and exported.stop_ids == eager.stop_ids


def _llama2_style_sentencepiece() -> bytes:
    """A sentencepiece BPE model trained like Llama 2's (byte fallback, split digits, a dummy prefix, no
    normalization) on the small corpus."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(l3.CORPUS * 4), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def test_sentencepiece_tokenizer_equals_sentencepiece(tmp_path):
    """A sentencepiece LLaMA as llama.cpp writes one (tokenizer.ggml.model 'llama': pieces, scores and
    token types of its tokenizer.model): the tokenizer built from the metadata encodes and decodes as
    sentencepiece itself and as transformers' GGUF tokenizer."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer

    from llama_export.text import load_tokenizer, text_files_in
    from llama_export.text.sentencepiece import SentencePieceTokenizer

    data = _llama2_style_sentencepiece()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)

    def add_spm(w) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list([p.piece for p in proto.pieces])
        w.add_token_scores([p.score for p in proto.pieces])
        w.add_token_types([int(p.type) for p in proto.pieces])
        w.add_bos_token_id(proto.trainer_spec.bos_id)
        w.add_eos_token_id(proto.trainer_spec.eos_id)
        w.add_unk_token_id(proto.trainer_spec.unk_id)
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)

    cfg = dataclasses.replace(CFG, vocab_size=len(proto.pieces))
    path = write_gguf(tmp_path / "spm.gguf", cfg, random_meta_state(cfg), tokenizer=add_spm)
    tok = load_tokenizer(text_files_in(path), source=str(path))
    sp = SentencePieceTokenizer(data, source="trained")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = [*l3.CORPUS, "def main():\n    return 1\n", "  leading and  double spaces", "x=12345;y=2.5\t\ttabs"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == text
        # transformers' GGUF tokenizer (a Metaspace pre-tokenizer) adds no '▁' before text that starts
        # with a space, where sentencepiece and llama.cpp do
        if not text.startswith(" "):
            assert ids == ref(text)["input_ids"], text
        assert ids == sp.encode(text), text
    # a control token stays whole, and the text after it gets its '▁' (llama.cpp's llama-server /tokenize
    # with parse_special gives these ids for this file: <s> ▁a </s> ▁ b)
    assert [tok.tok.id_to_token(i) for i in tok.encode("a</s>b")] == ["<s>", "\u2581a", "</s>", "\u2581", "b"]
    assert tok.bos_id == sp.bos_id and tok.stop_ids == sp.stop_ids
