"""`llama-export serve` as a user starts it: it listens on loopback, answers, drains the requests in
flight on SIGTERM and exits 0; a port in use is one line and exit 2; a model that fails while serving
ends the server with one line and a non-zero exit (for a supervisor to restart it)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import REPO, random_meta_state, tiny_config, write_meta


def _start(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "llama_export.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stderr.readline()
    m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
    assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(m.group(1))


def _post(port: int, body: dict, *, timeout: float = 60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0():
    proc, port = _start("--max-batch", "2", "--grace", "60")
    try:
        body = {"model": "demo", "prompt": "def ", "max_tokens": 40, "temperature": 0, "stream": True}
        events: list[str] = []
        with _post(port, body) as resp:
            events.append(resp.readline().decode())  # the first token is out: the request is in flight
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(OSError):  # no new requests once the shutdown began
                _post(port, {"model": "demo", "prompt": "x", "max_tokens": 1}, timeout=5)
            events += [line.decode() for line in resp]
        data = [e for e in events if e.startswith("data: ")]
        assert data[-1].strip() == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in data[:-1]]
        assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llama_export.cli", "serve", "--port", str(port)], capture_output=True,
                           text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "--port" in lines[0]


def test_a_model_that_fails_while_serving_ends_the_server_non_zero(tmp_path):
    """NaN weights: the request gets an error object, the server stops with one line (exit 2)."""
    cfg = tiny_config("gqa")
    state = random_meta_state(cfg, seed=2)
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")
    ckpt = write_meta(tmp_path / "nan", cfg, state)
    proc, port = _start("--checkpoint", str(ckpt))
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(port, {"model": "nan", "prompt": [1, 2, 3], "max_tokens": 4})
        assert e.value.code == 500 and "non-finite" in json.loads(e.value.read())["error"]["message"]
        assert proc.wait(60) == 2
        err = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
        assert len(err) == 1 and "non-finite" in err[0] and "restart" in err[0], err
    finally:
        proc.kill()


@pytest.mark.parametrize("args,words", [(["--api-key", ""], "--api-key is empty"),
                                        (["--host", "203.0.113.9", "--port", "0"], "cannot listen on 203.0.113.9")])
def test_a_bad_key_or_host_is_one_line_and_exit_2(args, words):
    r = subprocess.run([sys.executable, "-m", "llama_export.cli", "serve", *args], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
