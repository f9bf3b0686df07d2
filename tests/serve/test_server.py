"""`llama-export serve`'s app on a live uvicorn server on loopback, driven by the official `openai`
client: completions and chat, streaming and not, concurrent requests = each prompt alone, errors as
OpenAI error objects, the API key, /health, /metrics, a disconnecting client freeing its slot."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_export.config import Backend, ModelConfig
from llama_export.engine import open_engine
from llama_export.engine.generate import SamplingConfig
from llama_export.runner.source import ModelSource
from llama_export.serve.server import serve
from tests.helpers import hf_model_from_meta, random_meta_state, write_hf
from tests.llama3_text import VOCAB, write_hf_files

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=176, max_seq_len=128)
KEY = "sk-test-key"
MODEL = "tiny-llama3"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(base url, engine) of a server on a free loopback port, with an API key; stopped at the end."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = write_hf(root / "hf", hf_model_from_meta(CFG, random_meta_state(CFG, seed=4)))
    write_hf_files(ckpt)
    engine = open_engine(ModelSource(Backend.EAGER, checkpoint=ckpt).resolve(), slots=4, capacity=96, prefill_tokens=16)
    started = threading.Event()
    holder = {}

    def on_started(port, stop):
        holder.update(port=port, stop=stop)
        started.set()

    t = threading.Thread(target=serve, args=(engine,), kwargs=dict(model_name=MODEL, port=0, api_key=KEY,
                                                                     on_started=on_started, grace_s=5), daemon=True)
    t.start()
    assert started.wait(60), "the server did not start"
    yield f"http://127.0.0.1:{holder['port']}", engine
    holder["stop"]()
    t.join(30)
    assert not t.is_alive()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _alone(engine, prompt: str, n: int) -> list[int]:
    return engine.generate([prompt], max_tokens=n, sampling=SamplingConfig())[0].tokens


def test_completion_greedy_equals_the_engine_alone(live, client):
    url, engine = live
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0)
    ids = _alone(engine, "The quick brown", 8)
    tok = engine.tokenizer
    assert r.choices[0].text == tok.decode(tok.until_stop(ids), skip_special=True)
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(tok.encode("The quick brown"))
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL


def test_streaming_chunks_join_to_the_text_and_end_with_done(live, client):
    url, engine = live
    full = client.completions.create(model=MODEL, prompt="Café au", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Café au", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = urllib.request.urlopen(urllib.request.Request(
        url + "/v1/completions", data=json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}), timeout=60).read().decode()
    assert raw.rstrip().endswith("data: [DONE]")


def test_chat_uses_the_template_streamed_and_not(live, client):
    url, engine = live
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    ids = engine.tokenizer.chat(msgs)
    want = engine.generate([ids], max_tokens=8)[0]
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want.text


def test_sixteen_concurrent_ragged_requests_equal_their_single_runs(live, client):
    url, engine = live
    prompts = ["a" * (1 + i % 5) + " b" * (i % 7) for i in range(16)]
    seeded = SamplingConfig(temperature=0.8, top_p=0.9, seed=77)

    def one(i):
        if i % 2:
            return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0.8,
                                             top_p=0.9, seed=77).choices[0].text
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    tok = engine.tokenizer
    for i, text in enumerate(got):
        ids = engine.generate([prompts[i]], max_tokens=6, sampling=seeded if i % 2 else SamplingConfig())[0].tokens
        assert text == tok.decode(tok.until_stop(ids), skip_special=True), i


def _post(url: str, body, *, key: str | None = KEY, path="/v1/completions", raw: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD = [
    ("no key", dict(body={"model": MODEL, "prompt": "x"}, key=None), 401, "API key"),
    ("wrong key", dict(body={"model": MODEL, "prompt": "x"}, key="sk-nope"), 401, "API key"),
    ("malformed JSON", dict(body=None, raw=b"{not json"), 400, "not valid JSON"),
    ("not an object", dict(body=[1, 2]), 400, "JSON object"),
    ("unknown field", dict(body={"model": MODEL, "prompt": "x", "best_of": 2}), 400, "best_of"),
    ("mistyped field", dict(body={"model": MODEL, "prompt": "x", "max_tokens": "ten"}), 400, "max_tokens"),
    ("n > 1", dict(body={"model": MODEL, "prompt": "x", "n": 2}), 400, "n"),
    ("temperature < 0", dict(body={"model": MODEL, "prompt": "x", "temperature": -1}), 400, "temperature"),
    ("top_p 0", dict(body={"model": MODEL, "prompt": "x", "top_p": 0}), 400, "top_p"),
    ("empty prompt", dict(body={"model": MODEL, "prompt": ""}), 400, "empty"),
    ("prompt longer than a slot", dict(body={"model": MODEL, "prompt": "word " * 200}), 400, "of a slot"),
    ("token id outside the vocabulary", dict(body={"model": MODEL, "prompt": [1, VOCAB]}), 400, "vocabulary"),
    ("unknown model", dict(body={"model": "gpt-9", "prompt": "x"}), 404, "does not exist"),
    ("missing messages", dict(body={"model": MODEL}, path="/v1/chat/completions"), 400, "messages"),
    ("bad role", dict(body={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
                      path="/v1/chat/completions"), 400, "role"),
    ("unknown route", dict(body={}, path="/v1/embeddings"), 404, "no route"),
]


# The server's section of docs/errors.md is generated from these cases, as the CLI's table is: every
# case checks its own row; LLAMA_EXPORT_WRITE_ERROR_TABLE=1 rewrites the section from a run of them all.
ERRORS_MD = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
SECTION = "\n## The server (`llama-export serve`)\n"
CASES = [b[0] for b in BAD] + ["body over the limit"]
_ROWS: dict[str, str] = {}


def _row(name: str, status: int, body: dict) -> str:
    return f"| {name} | {status} | {body['error']['type']} | `{body['error']['message'].replace('|', '/')}` |"


def _record(name: str, status: int, body: dict) -> None:
    _ROWS[name] = _row(name, status, body)
    if os.environ.get("LLAMA_EXPORT_WRITE_ERROR_TABLE") != "1":
        have = ERRORS_MD.read_text().partition(SECTION)[2]
        assert _ROWS[name] in have.splitlines(), (f"docs/errors.md is out of date for {name!r}: "
                                                  "LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest tests/serve")


@pytest.mark.parametrize("name,kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_error_objects(live, name, kw, status, words):
    got, body = _post(live[0], **kw)
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert words in body["error"]["message"], body
    _record(name, got, body)


def test_a_body_over_the_limit_is_refused_before_it_is_read(live):
    import http.client

    host, port = live[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                 "Content-Length": str(64 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b'{"model": "' + MODEL.encode() + b'", "prompt": "')  # and no more
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 413 and "over" in body["error"]["message"]
    conn.close()
    _record("body over the limit", resp.status, body)


def test_the_server_table_has_a_row_per_case():
    """(Runs after the cases.) With LLAMA_EXPORT_WRITE_ERROR_TABLE=1: rewrites the section."""
    text = ERRORS_MD.read_text()
    head, _, have = text.partition(SECTION)
    if os.environ.get("LLAMA_EXPORT_WRITE_ERROR_TABLE") == "1":
        assert set(_ROWS) == set(CASES), "write the section from a run of the whole module"
        rows = "\n".join(_ROWS[c] for c in CASES)
        ERRORS_MD.write_text(f"{head.rstrip()}\n{SECTION}\nEvery bad request gets OpenAI's error object "
                             "(`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`); generated by "
                             "`tests/serve/test_server.py` against a live server.\n\n| request | status | type | message |\n"
                             f"| --- | --- | --- | --- |\n{rows}\n")
        return
    assert len([ln for ln in have.splitlines() if ln.startswith("| ") and not ln.startswith(("| request", "| ---"))]) \
        == len(CASES), "docs/errors.md's server section needs a row per case: LLAMA_EXPORT_WRITE_ERROR_TABLE=1 pytest tests/serve"


def test_the_client_sees_errors_as_its_exceptions(live, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live[0] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_models_health_and_metrics(live, client):
    url, engine = live
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2, temperature=0)
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for name in ("llama_export_requests_total", "llama_export_prompt_tokens_total", "llama_export_generated_tokens_total",
                 "llama_export_queue_depth", "llama_export_active_slots",
                 "llama_export_time_to_first_token_seconds_bucket", "llama_export_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live):
    import http.client

    url, engine = live
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 90,
                                                             "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: it is running
    assert engine.active >= 1
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


def _toy_engine(step, *, slots: int):
    """An engine on `step`, a stand-in model (vocabulary 8, 16 tokens per slot, a one-layer toy cache)."""
    import numpy as np

    from llama_export.engine.engine import Engine, Ranks

    def make_cache(batch, capacity):
        return [np.zeros((batch, 1, capacity, 2), np.float32)], [np.zeros((batch, 1, capacity, 2), np.float32)]

    return Engine(Ranks([step], [make_cache], slots=slots, capacity=16), vocab_size=8, slots=slots, capacity=16)


def test_a_failed_engine_turns_health_to_503_and_requests_get_a_server_error():
    """The model fails mid-request (non-finite logits, as a dead rank's garbage would): the request ends
    with an error object, not a hang; /health says 503 (and `serve` then exits non-zero: test_serve_cli)."""
    import numpy as np
    from starlette.testclient import TestClient

    from llama_export.serve.app import create_app

    def step(tokens, cached, lengths, keys, values):
        return np.full((len(tokens), 8), np.nan, dtype=np.float32), keys, values

    engine = _toy_engine(step, slots=2)
    with TestClient(create_app(engine, model_name="m")) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 3})
        assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
        h = http.get("/health")
        assert h.status_code == 503 and "non-finite" in h.json()["error"]
        r = http.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 3})
        assert r.status_code == 503 and "not serving" in r.json()["error"]["message"]
    engine.close(timeout=10)


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from llama_export.serve.app import default_sampling
    from llama_export.text import load_tokenizer, text_files_in
    from tests.llama3_text import special_id

    assert default_sampling(None) == SamplingConfig(temperature=1.0, top_p=1.0)
    folder = write_hf_files(tmp_path / "t", generation_eos=[special_id("<|eot_id|>")])
    tok = load_tokenizer(text_files_in(folder), source="t")
    assert default_sampling(tok.generation) == SamplingConfig(temperature=0.0)  # no do_sample: greedy
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.6,
                                                                "top_p": 0.9}))
    tok = load_tokenizer(text_files_in(folder), source="t")
    assert default_sampling(tok.generation) == SamplingConfig(temperature=0.6, top_p=0.9, top_k=50)
    assert tok.stop_ids >= {special_id("<|eot_id|>")}


def test_a_full_queue_gets_429_with_retry_after_and_a_wrong_method_405():
    import numpy as np
    from starlette.testclient import TestClient

    from llama_export.engine import Request
    from llama_export.serve.app import create_app

    go = threading.Event()

    def step(tokens, cached, lengths, keys, values):  # a model that takes its time
        go.wait(30)
        logits = np.zeros((len(tokens), 8), dtype=np.float32)
        logits[:, 3] = 1
        return logits, keys, values

    engine = _toy_engine(step, slots=1)
    running = engine.submit(Request((1, 2), max_tokens=2))
    waiting = engine.submit(Request((1, 2), max_tokens=2))
    deadline = time.monotonic() + 10
    while engine.queued != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with TestClient(create_app(engine, model_name="m", max_queue=1)) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": [1], "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = http.get("/v1/completions")
        assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    go.set()
    assert running.result(timeout=30).tokens == [3, 3] and waiting.result(timeout=30).tokens == [3, 3]
    engine.close(timeout=10)


def test_a_model_without_a_tokenizer_streams_an_event_per_token():
    """Token-id prompts on a model without tokenizer files: text is empty, but a streaming client still
    sees every token as it comes (and the usage counts them)."""
    import numpy as np
    from starlette.testclient import TestClient

    from llama_export.serve.app import create_app

    def step(tokens, cached, lengths, keys, values):
        logits = np.zeros((len(tokens), 8), dtype=np.float32)
        logits[:, 5] = 1
        return logits, keys, values

    engine = _toy_engine(step, slots=1)
    with TestClient(create_app(engine, model_name="m")) as http:
        body = {"model": "m", "prompt": [1, 2], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * 4 + ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    engine.close(timeout=10)
