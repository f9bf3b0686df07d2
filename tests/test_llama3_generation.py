"""Llama 3 text generation end to end: a tiny random Llama in bf16 (as Llama 3 ships) with a trained
Llama-3-style tokenizer, against transformers' tokenizer, chat template and `generate`; the same through
an ONNX Runtime export at TP=2 after the checkpoint folder is gone; Meta's format; bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama_export.cli import main
from llama_export.config import ModelConfig, RopeScaling
from llama_export.demo import DEMO_DIR
from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params
from llama_export.text import single_turn
from tests.helpers import MULTIPLE_OF, hf_model_from_meta, random_meta_state, read_json, write_hf
from tests.llama3_text import VOCAB, special_id, write_hf_files, write_meta_tokenizer

PROMPT = "Café au lait, 😀 and"
USER, SYSTEM = "Name a colour. 🎨", "You are terse."
NEW = 16
STOPS = [special_id("<|end_of_text|>"), special_id("<|eot_id|>")]
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=176, max_seq_len=96,
                  rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_generation_config(folder, eos: list[int]) -> None:
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": special_id("<|begin_of_text|>"),
                                                              "eos_token_id": eos}))


def _hf_generate(folder, ids: list[int]) -> list[int]:
    """transformers' greedy generate from the checkpoint folder (bf16 weights, run in fp32), stopping as
    its generation_config.json says; the generated ids, the final eos included."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=special_id("<|end_of_text|>"))
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """HF checkpoint (bf16 safetensors + Llama 3 tokenizer files) whose generation_config.json names an
    ordinary token X as an eos, chosen so that greedy generation meets X before NEW tokens."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("llama3")
    state = {k: v.to(torch.bfloat16) for k, v in random_meta_state(CFG, seed=3).items()}
    ckpt = write_hf(root / "hf", hf_model_from_meta(CFG, {k: v.float() for k, v in state.items()}).to(torch.bfloat16))
    assert read_json(ckpt / "config.json")["dtype"] == "bfloat16"
    write_hf_files(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt_ids = tok(PROMPT)["input_ids"]
    chat_ids = tok.apply_chat_template(single_turn(USER, system=SYSTEM), add_generation_prompt=True,
                                       return_dict=False)
    _write_generation_config(ckpt, STOPS)
    free = _hf_generate(ckpt, prompt_ids)
    assert len(free) == NEW
    k = next(i for i in range(3, NEW) if free[i] not in free[:i])
    extra = free[k]  # not the tokenizer's eos: only generation_config.json names it
    _write_generation_config(ckpt, STOPS + [extra])
    expected = _hf_generate(ckpt, prompt_ids)
    assert expected == free[:k + 1]
    meta = root / "meta"
    save_meta_checkpoint(meta, state, to_meta_params(CFG, multiple_of=MULTIPLE_OF))
    write_meta_tokenizer(meta)
    return {"ckpt": ckpt, "meta": meta, "root": root, "tok": tok, "prompt_ids": prompt_ids, "chat_ids": chat_ids,
            "expected": expected, "chat_expected": _hf_generate(ckpt, chat_ids), "extra": extra}


def test_prompt_equals_transformers_and_stops_at_generation_config_eos(llama3, capsys, tmp_path):
    code, out, err = _cli(capsys, "--checkpoint", str(llama3["ckpt"]), "--prompt", PROMPT,
                          "--max-new-tokens", str(NEW), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    (r,) = read_json(tmp_path / "r.json")["batches"]
    assert r["prompt_ids"] == [llama3["prompt_ids"]]  # BOS included
    assert r["tokens"] == [llama3["expected"]]  # ends with the generation_config-only eos
    reply = llama3["tok"].decode(llama3["expected"][:-1])
    assert out == PROMPT + reply + "\n"


def test_chat_equals_apply_chat_template_and_generate(llama3, capsys, tmp_path):
    code, out, err = _cli(capsys, "--checkpoint", str(llama3["ckpt"]), "--chat", USER, "--system", SYSTEM,
                          "--max-new-tokens", str(NEW), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    (r,) = read_json(tmp_path / "r.json")["batches"]
    assert r["prompt_ids"] == [llama3["chat_ids"]]
    assert r["tokens"] == [llama3["chat_expected"]]
    stops = set(STOPS + [llama3["extra"]])
    reply = llama3["chat_expected"]
    reply = reply[:next((i for i, t in enumerate(reply) if t in stops), len(reply))]
    assert out == llama3["tok"].decode(reply) + "\n"  # the reply only, no prompt


def test_meta_format_chat(llama3, capsys, tmp_path):
    """Meta's .pth (bf16) + tiktoken tokenizer.model: Meta's chat format gives the ids transformers' Llama 3
    template gives; generation stops at Meta's stop tokens only (no generation_config.json)."""
    from transformers import LlamaForCausalLM

    code, out, err = _cli(capsys, "--checkpoint", str(llama3["meta"]), "--chat", USER, "--system", SYSTEM,
                          "--max-new-tokens", str(NEW), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    (r,) = read_json(tmp_path / "r.json")["batches"]
    assert r["prompt_ids"] == [llama3["chat_ids"]]
    model = LlamaForCausalLM.from_pretrained(llama3["ckpt"], dtype=torch.float32).eval()
    meta_stops = STOPS + [special_id("<|eom_id|>")]
    ref = model.generate(torch.tensor([llama3["chat_ids"]]), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=meta_stops, pad_token_id=STOPS[0])[0, len(llama3["chat_ids"]):].tolist()
    assert r["tokens"] == [ref]


@pytest.mark.slow
def test_export_tp2_runs_after_the_checkpoint_is_deleted(llama3, capsys, tmp_path):
    ckpt = shutil.copytree(llama3["ckpt"], tmp_path / "llama3-tiny")
    # Exit 0: the fp32 (TP=2) and fp16 (TP=1) graphs made from the bf16 checkpoint passed the export's own
    # check against eager at the same dtype (prefill + greedy steps, per-dtype tolerances).
    for tp, dtype in (("2", "fp32"), ("1", "fp16")):
        assert main(["export", "--checkpoint", str(ckpt), "--tp", tp, "--dtype", dtype, "--out", str(tmp_path / "g"),
                     "--no-progress"]) == 0, capsys.readouterr()
    capsys.readouterr()
    shutil.rmtree(ckpt)
    fp32 = tmp_path / "g" / "llama3-tiny" / "tp2-fp32"
    manifest = read_json(fp32 / "manifest.json")
    recorded = {f["name"] for f in manifest["text_files"]}
    assert recorded == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    code, out, err = _cli(capsys, "--backend", "ort", "--artifacts", str(fp32), "--tp", "2", "--prompt", PROMPT,
                          "--max-new-tokens", str(NEW), "--json", str(tmp_path / "p.json"))
    assert code == 0, err
    assert read_json(tmp_path / "p.json")["batches"][0]["tokens"] == [llama3["expected"]]
    code, out, err = _cli(capsys, "--backend", "ort", "--artifacts", str(fp32), "--tp", "2", "--chat", USER,
                          "--system", SYSTEM, "--max-new-tokens", str(NEW), "--json", str(tmp_path / "c.json"))
    assert code == 0, err
    (c,) = read_json(tmp_path / "c.json")["batches"]
    assert (c["prompt_ids"], c["tokens"]) == ([llama3["chat_ids"]], [llama3["chat_expected"]])
    # A text file changed after export is caught by its hash.
    (fp32 / "tokenizer_config.json").write_text("{}")
    code, _, err = _cli(capsys, "--backend", "ort", "--artifacts", str(fp32), "--prompt", PROMPT, "--tp", "2")
    assert code == 2 and "tokenizer_config.json has sha256" in err, err


def _tiny_checkpoint(folder):
    state = random_meta_state(CFG, seed=0)
    save_meta_checkpoint(folder, state, to_meta_params(CFG, multiple_of=MULTIPLE_OF))
    return folder


@pytest.mark.parametrize("case,args,match", [
    ("demo", ["--chat", "hi"], "has no chat template"),
    ("no-template", ["--chat", "hi"], "has no chat template"),
    ("bad-template", ["--chat", "hi"], "the chat template of .* failed to render: roles must alternate"),
    ("bad-tokenizer", ["--prompt", "hi"], "tokenizer.model is not a tokenizer this tool reads"),
    ("no-tokenizer", ["--prompt", "hi"], "has no tokenizer.model or tokenizer.json; .*use --prompt-ids"),
])
def test_bad_text_input_is_one_line(capsys, tmp_path, case, args, match):
    if case == "demo":
        ckpt = DEMO_DIR
    else:
        ckpt = _tiny_checkpoint(tmp_path / "c")
        if case == "no-template":
            write_hf_files(ckpt, chat_template=None)
        elif case == "bad-template":
            write_hf_files(ckpt, chat_template="{{ raise_exception('roles must alternate') }}")
        elif case == "bad-tokenizer":
            (ckpt / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer")
    code, out, err = _cli(capsys, "--checkpoint", str(ckpt), *args)
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(match, err), err
