"""The long-lived engine: requests of any length submitted at any time from several threads, batched
step by step into KV cache slots, give exactly what a run of each prompt alone gives (greedy, and seeded
sampling), on the eager model and on an ONNX Runtime export, at TP=1 and TP=2 (ranks as threads)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from llama_export.config import Backend
from llama_export.engine import Request, open_engine
from llama_export.engine.engine import LENGTH, STOP, Engine, Ranks
from llama_export.engine.batch import generate
from llama_export.engine.generate import SamplingConfig
from llama_export.errors import InputError, LlamaExportError
from llama_export.export.exporter import ExportOptions, export
from llama_export.model.checkpoint import build_model
from llama_export.runner.source import ModelSource
from tests.helpers import random_meta_state, tiny_config, write_meta

PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 1, 2, 3, 4], [11, 2], [60, 61, 62, 63, 64], [9], [30, 31, 32, 33, 34, 35, 36, 37, 38],
           [70, 71, 72]]
NEW = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    cfg = tiny_config("gqa")
    ckpt = write_meta(root / "ckpt", cfg, random_meta_state(cfg, seed=11))
    return cfg, ckpt, root


def _alone(ckpt, prompt, *, new=NEW, sampling=SamplingConfig()):
    """The ids of `prompt` generated alone by the batch loop (`run`'s)."""
    m = build_model(ckpt, tp=1, rank=0)
    out = generate(m.step, np.asarray([prompt]), m.empty_cache(1, len(prompt) + new), max_new_tokens=new,
                   sampling=sampling)
    return [int(t) for t in out.new_tokens[0]]


def _submit_from_threads(engine, requests):
    """Submit every request from its own thread at once; the completions in request order."""
    handles = [None] * len(requests)

    def go(i):
        handles[i] = engine.submit(requests[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [h.result(timeout=120) for h in handles]


@pytest.mark.parametrize("backend", [Backend.EAGER, Backend.ORT])
def test_ragged_requests_in_few_slots_equal_each_prompt_alone(model, backend):
    """6 prompts of 1-11 tokens through 3 slots, prompts prefilled 4 tokens per step (so prefill chunks
    and decode steps of other rows interleave): every request's greedy ids = its run alone."""
    cfg, ckpt, root = model
    source = ModelSource(Backend.EAGER, checkpoint=ckpt) if backend is Backend.EAGER else \
        ModelSource(Backend.ORT, artifacts=export(ExportOptions(checkpoint=ckpt, out=root / "g", tp=1, progress=False)))
    with open_engine(source.resolve(), slots=3, capacity=32, prefill_tokens=4) as engine:
        got = _submit_from_threads(engine, [Request(tuple(p), max_tokens=NEW) for p in PROMPTS])
        assert engine.steps > NEW  # the requests did not all run at once
    for p, c in zip(PROMPTS, got):
        assert c.tokens == _alone(ckpt, p), p
        assert c.finish_reason == LENGTH and c.prompt == tuple(p)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    cfg, ckpt, _ = model
    s = SamplingConfig(temperature=0.9, top_p=0.95, seed=1234)
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=4, capacity=32) as engine:
        alone = engine.generate([PROMPTS[0]], max_tokens=NEW, sampling=s)[0].tokens
        crowd = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], max_tokens=NEW, sampling=s)[1].tokens
    assert alone == crowd == _alone(ckpt, PROMPTS[0], sampling=s)
    assert alone != _alone(ckpt, PROMPTS[0])  # sampling, not greedy (this seed picks another token)


def test_tp2_ranks_as_threads_equal_tp1(model):
    cfg, ckpt, _ = model
    source = ModelSource(Backend.EAGER, checkpoint=ckpt)
    with open_engine(source.resolve(), tp=2, slots=2, capacity=32, prefill_tokens=3) as engine:
        got = engine.generate(PROMPTS[:4], max_tokens=NEW)
    assert [c.tokens for c in got] == [_alone(ckpt, p) for p in PROMPTS[:4]]


def test_stop_ids_end_a_request_with_reason_stop(model):
    cfg, ckpt, _ = model
    ids = _alone(ckpt, PROMPTS[2])
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=2, capacity=32) as engine:
        c = engine.generate([PROMPTS[2]], max_tokens=NEW, stop_ids=[ids[2]])[0]
    assert c.tokens == ids[:ids.index(ids[2]) + 1] and c.finish_reason == STOP


def test_text_streaming_and_stop_strings_with_the_demo_tokenizer():
    """The demo model's tokenizer: streamed deltas join to the completion's text = decode(ids); a stop
    string cuts the text before it and ends the request."""
    with open_engine(ModelSource(Backend.EAGER).resolve(), slots=2, capacity=64) as engine:
        tok = engine.tokenizer
        pieces = list(engine.stream("def ", max_tokens=12))
        ids = [t for t, _ in pieces if t is not None]
        text = "".join(d for _, d in pieces)
        assert text == tok.decode(tok.until_stop(ids), skip_special=True)
        assert len(text) >= 6, text
        stop = text[3:5]
        c = engine.generate(["def "], max_tokens=12, stop=[stop])[0]
        assert c.finish_reason == STOP and c.text == text[:text.index(stop)]
        assert c.tokens == ids[:len(c.tokens)]


def test_bad_requests_are_refused_at_submit(model):
    cfg, ckpt, _ = model
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=1, capacity=16) as engine:
        with pytest.raises(InputError, match=r"of a slot \(16 tokens"):
            engine.submit(Request(tuple(range(1, 12)), max_tokens=8))
        with pytest.raises(InputError, match="outside the vocabulary"):
            engine.submit(Request((1, cfg.vocab_size), max_tokens=2))
        with pytest.raises(InputError, match="empty"):
            engine.submit(Request((), max_tokens=2))
        assert engine.generate([[1, 2]], max_tokens=2)[0].tokens  # still serving


def test_a_failing_model_ends_every_request_with_its_error_not_a_hang():
    calls = []

    def step(tokens, cached, lengths, keys, values):
        calls.append(len(tokens))
        logits = np.zeros((len(tokens), 8), dtype=np.float32)
        if len(calls) >= 3:
            logits[:] = np.nan
        return logits, keys, values

    def make_cache(batch, capacity):
        return [np.zeros((batch, 1, capacity, 2), np.float32)], [np.zeros((batch, 1, capacity, 2), np.float32)]

    engine = Engine(Ranks([step], [make_cache], slots=2, capacity=16), vocab_size=8, slots=2, capacity=16)
    handles = [engine.submit(Request((1, 2), max_tokens=10)) for _ in range(3)]
    for h in handles:
        with pytest.raises(LlamaExportError, match="non-finite logits"):
            h.result(timeout=30)
    with pytest.raises(LlamaExportError, match="stopped after an error"):
        engine.submit(Request((1,), max_tokens=1))
    engine.close(timeout=10)


def test_close_finishes_what_was_submitted(model):
    cfg, ckpt, _ = model
    engine = open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=1, capacity=32)
    handles = [engine.submit(Request(tuple(p), max_tokens=3)) for p in PROMPTS[:3]]
    engine.close(timeout=60)
    assert [len(h.result(timeout=1).tokens) for h in handles] == [3, 3, 3]
    with pytest.raises(InputError, match="closed"):
        engine.submit(Request((1,), max_tokens=1))


def test_cancel_frees_the_slot_for_the_next_request(model):
    cfg, ckpt, _ = model
    with open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=1, capacity=64) as engine:
        long = engine.submit(Request((1, 2, 3), max_tokens=50))
        waiting = engine.submit(Request(tuple(PROMPTS[2]), max_tokens=NEW))
        next(iter(long))  # it is running
        engine.cancel(long)
        c = long.result(timeout=60)
        assert c.finish_reason == "cancelled" and 1 <= len(c.tokens) < 50
        assert waiting.result(timeout=60).tokens == _alone(ckpt, PROMPTS[2])
