"""One system, one workload, in its own process (so its peak RSS is its own); used by bench_peers.py.

    python benchmarks/peers_worker.py SYSTEM MODEL_PATH WORKLOAD.json RESULT.json

SYSTEM: ours-ort | ours-eager | transformers | genai | llamacpp. WORKLOAD.json holds
{"prompts": [[ids...], ...], "new": N, "max_len": L}; prompts run one after another (batch 1), after one
short warm-up generation. Every system does the same work per prompt: one forward over the prompt and a
greedy pick (prefill), then N-1 single-token forwards each followed by a greedy pick (decode). Times are
wall clock around exactly that; loading and the warm-up are excluded. RESULT.json gets, per prompt,
prefill seconds, decode seconds, the generated ids and whether every step's logits were finite (ours and
llama.cpp; null where not checked), plus the process's load time, resident set right after loading and
peak RSS.
Thread counts come from the environment the parent sets (OMP_NUM_THREADS) and the `threads` argument.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench_common import REPO, peak_rss


def _timed(first, rest, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """first(prompt) -> token after a prompt forward; rest(token) -> next token after a 1-token forward."""
    t0 = time.perf_counter()
    tok = first(prompt)
    t1 = time.perf_counter()
    ids = [tok]
    for _ in range(new - 1):
        tok = rest(tok)
        ids.append(tok)
    return t1 - t0, time.perf_counter() - t1, ids


# ---- llama_export (this repository) -------------------------------------------------------------
def ours(path: Path, backend: str, threads: int):
    import numpy as np

    sys.path.insert(0, str(REPO))
    from llama_export.config import Backend
    from llama_export.parallel.comm import LocalComm
    from llama_export.engine.batch import generate
    from llama_export.runner.source import ModelSource

    b = Backend(backend)
    source = ModelSource(b, checkpoint=path if b is Backend.EAGER else None,
                         artifacts=path if b is not Backend.EAGER else None)
    # as `llama-export run` does: the eager model imports torch (and takes `threads`); ORT imports none
    step, make_cache, _ = source.step(comm=LocalComm(), device="cpu", threads=threads)

    def run(prompt: list[int], new: int):
        r = generate(step, np.array([prompt]), make_cache(1, len(prompt) + new), max_new_tokens=new)
        finite = all(bool(np.isfinite(s.logits).all()) for s in r.steps)
        return r.prefill_s, r.decode_s, r.new_tokens[0].tolist(), finite

    return run


# ---- transformers ---------------------------------------------------------------------------------
def hf_transformers(path: Path, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(prompt: list[int], new: int):
        cache = transformers.DynamicCache()

        def forward(ids: list[int]) -> int:
            with torch.inference_mode():
                out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            return int(out.logits[0, -1].argmax())

        return _timed(forward, lambda t: forward([t]), prompt, new)

    return run


# ---- onnxruntime-genai ----------------------------------------------------------------------------
def genai(path: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(prompt: list[int], new: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)

        # append_tokens runs the prompt forward; generate_next_token then picks from those logits, and
        # from its second call on first runs the 1-token forward of the previous pick.
        def first(ids: list[int]) -> int:
            gen.append_tokens([ids])
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        def rest(_tok: int) -> int:
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        return _timed(first, rest, prompt, new)

    return run


# ---- llama.cpp ------------------------------------------------------------------------------------
def llamacpp(path: Path, threads: int, max_len: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_len, n_batch=2048, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def run(prompt: list[int], new: int):
        llm.reset()
        finite = []

        def forward(ids: list[int]) -> int:
            llm.eval(ids)  # logits of the last token only (logits_all=False), read in place
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            finite.append(bool(np.isfinite(logits).all()))
            return int(np.argmax(logits))

        return *_timed(forward, lambda t: forward([t]), prompt, new), all(finite)

    return run


def main() -> None:
    system, model_path, workload_path, result_path = sys.argv[1:5]
    work = json.loads(Path(workload_path).read_text())
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    path = Path(model_path)
    t0 = time.perf_counter()
    if system == "ours-ort":
        run = ours(path, "ort", threads)
    elif system == "ours-eager":
        run = ours(path, "eager", threads)
    elif system == "transformers":
        run = hf_transformers(path, threads)
    elif system == "genai":
        run = genai(path, threads)
    elif system == "llamacpp":
        run = llamacpp(path, threads, work["max_len"])
    else:
        raise SystemExit(f"unknown system {system!r}")
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss("VmRSS")
    run(work["prompts"][0][:16], 4)  # warm-up: first-call set-up is not part of any timing
    rows = []
    for prompt in work["prompts"]:
        prefill_s, decode_s, ids, *finite = run(prompt, work["new"])
        rows.append({"prefill_s": prefill_s, "decode_s": decode_s, "ids": ids,
                     "finite": finite[0] if finite else None})
    peak = peak_rss()
    Path(result_path).write_text(json.dumps({"load_s": load_s, "rss_loaded": rss_loaded, "peak_rss": peak, "runs": rows}))


if __name__ == "__main__":
    main()
