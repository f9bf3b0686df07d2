"""One loop: the engine's grouped prefill gives each request what its prompt gives alone (against a
plain prefill-then-decode loop over the model's step, not the engine); `run` goes through the engine
and its greedy ids equal transformers' on the demo model at TP=1 and TP=2, its --json keeping its
format; eval's windows are the engine's scoring requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_export.config import Backend
from llama_export.demo import DEMO_DIR
from llama_export.engine import Request, open_engine
from llama_export.engine.generate import SamplingConfig, sample
from llama_export.errors import InputError
from llama_export.model.checkpoint import build_model, load_config
from llama_export.runner.source import ModelSource
from tests.helpers import hf_model_from_meta, random_meta_state, read_json, run_cli, tiny_config, write_meta

NEW = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config("gqa")
    return write_meta(tmp_path_factory.mktemp("one_loop") / "ckpt", cfg, random_meta_state(cfg, seed=21))


def _plain_loop(model, prompt: list[int], new: int, sampling: SamplingConfig) -> list[int]:
    """The reference: the whole prompt in one step call, then one token per call, sampled as a request
    alone samples (its own generator seeded with its seed)."""
    keys, values = model.empty_cache(1, len(prompt) + new)
    rng = np.random.default_rng(sampling.seed)
    tokens, cached, out = np.array([prompt]), np.zeros(1, np.int64), []
    for _ in range(new):
        n = np.array([tokens.shape[1]])
        logits, keys, values = model.step(tokens, cached, n, keys, values)
        out.append(int(sample(np.asarray(logits, dtype=np.float32), sampling, rng)[0]))
        cached, tokens = cached + n, np.array([[out[-1]]])
    return out


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, top_p=0.95, seed=77)],
                         ids=["greedy", "seeded"])
def test_16_ragged_requests_with_grouped_prefill_equal_their_single_runs(ckpt, sampling):
    rng = np.random.default_rng(3)
    cfg = tiny_config("gqa")
    prompts = [rng.integers(1, cfg.vocab_size, size=int(n)).tolist() for n in rng.integers(1, 24, size=16)]
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=16, capacity=32,
                     prefill_tokens=512) as engine:
        got = engine.generate(prompts, max_tokens=NEW, sampling=sampling, stop_ids=())
        calls = engine.prefill_calls
    assert 1 <= calls < len(prompts)  # prompts shared prefill calls
    model = build_model(ckpt)
    for p, c in zip(prompts, got):
        assert c.tokens == _plain_loop(model, p, NEW, sampling), p
    if sampling.temperature:
        assert [c.tokens for c in got] != [_plain_loop(model, p, NEW, SamplingConfig()) for p in prompts]


def test_chunked_grouped_prefill_under_a_small_budget_equals_single_runs(ckpt):
    """Prompts cut into chunks of a 5-token budget per step, chunks of neighbouring rows in one call,
    decode rows stepping in between."""
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18], [19, 20, 21, 22, 23, 24, 25]]
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=3, capacity=24,
                     prefill_tokens=5) as engine:
        got = engine.generate(prompts, max_tokens=NEW, stop_ids=())
    model = build_model(ckpt)
    assert [c.tokens for c in got] == [_plain_loop(model, p, NEW, SamplingConfig()) for p in prompts]


def test_scoring_requests_give_the_log_probs_of_their_tokens(ckpt):
    """`Request.scoring` = log softmax of transformers' forward over prompt + continuation at those
    positions."""
    cfg = tiny_config("gqa")
    hf = hf_model_from_meta(cfg, random_meta_state(cfg, seed=21))  # the weights of `ckpt`
    prompt, cont = [5, 9, 2, 44], [17, 3, 8]
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=2, capacity=16) as engine:
        c = engine.submit(Request.scoring(prompt, cont)).result(timeout=60)
        with pytest.raises(InputError, match="scoring request"):
            engine.submit(Request(tuple(prompt), max_tokens=2, score=(1, 2, 3)))
    assert c.tokens == cont and len(c.logprobs) == len(cont)
    ids = prompt + cont
    with torch.no_grad():
        full = torch.log_softmax(hf(torch.tensor([ids])).logits.double(), dim=-1)[0]  # [S, V]
    want = [float(full[len(prompt) - 1 + k, t]) for k, t in enumerate(cont)]
    assert np.allclose(c.logprobs, want, atol=1e-4), (c.logprobs, want)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_run_batch_greedy_ids_equal_transformers_on_the_demo_model(tmp_path, tp):
    """`run --prompt-ids` (ragged rows, one batch, through the engine in every rank process) = transformers'
    greedy generate of each row alone; the --json keeps its keys."""
    tok = ModelSource(Backend.EAGER).resolve().tokenizer
    rows = [tok.encode(t) for t in ("def ", "class Parser:\n    def", "import os\n")]
    assert len({len(r) for r in rows}) == 3
    out = tmp_path / "r.json"
    r = run_cli("run", "--tp", str(tp), "--prompt-ids", ";".join(",".join(map(str, x)) for x in rows),
                "--max-new-tokens", str(NEW), "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = read_json(out)
    (batch,) = data["batches"]
    assert set(data) == {"backend", "tp", "first_token_s", "batches"}
    assert set(batch) == {"prompts", "prompt_ids", "tokens", "steps", "prefill_s", "decode_s"}
    assert [set(s) for s in batch["steps"]] == [{"tokens"}] * NEW
    assert batch["prompt_ids"] == rows and batch["prompts"] == [0, 1, 2]
    assert [s["tokens"] for s in batch["steps"]] == [list(t) for t in zip(*batch["tokens"])]

    cfg = load_config(DEMO_DIR)
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    hf = hf_model_from_meta(cfg, {k: v.float() for k, v in state.items()})
    for row, got in zip(rows, batch["tokens"]):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([row]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(row):].tolist()
        assert got == ref, (row, got, ref)
