"""Perplexity of a token stream under any step function (eager, ONNX Runtime, TensorRT; any TP).

Sliding windows of `window` tokens moved by `stride` (the scheme of Hugging Face's "Perplexity of
fixed-length models"): window 0 covers tokens [0, W) and scores tokens 1..W-1; window j >= 1 covers
[jS, jS + W) and scores only its last S tokens, so every token after the first is scored exactly once,
given at least W - S and at most W - 1 tokens before it (fewer only in window 0).

The step functions return last-token logits, so a window is streamed through the KV cache: its first
W - S tokens are one prefill (whose logits score token jS + W - S), then each further token is one
decode step that scores the next. The logits are exactly those a full-sequence forward over the window
would give at those positions, which is what the tests check against. That is the engine's scoring
request (`engine.Request.scoring`): each window is one, `batch` of them in the engine's slots at a time,
so eval runs the same loop as `run` and `serve`, with known tokens in place of sampled ones.

    NLL = -sum_i log softmax(logits_i)[t_i]  (in float64),   perplexity = exp(NLL / scored tokens)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_export.errors import InputError
from llama_export.parallel.plan import check_tp
from llama_export.progress import count_bar
from llama_export.engine.engine import Engine, Ranks, Request
from llama_export.runner.step import MakeCache, StepFn
from llama_export.runner.env import plan_once
from llama_export.runner.launch import on_ranks
from llama_export.runner.source import ModelSource, ResolvedSource
from llama_export.text.user_files import read_user_text


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # length of the stream
    scored: int  # tokens scored (tokens - 1)
    nll: float  # summed negative log-likelihood, nats
    window: int
    stride: int
    seconds: float

    @property
    def mean_nll(self) -> float:
        return self.nll / self.scored

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf past the largest float (a model that far off has no finite perplexity)."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(context start, first scored token, end) per window, end exclusive; the context is
    [start, first) and tokens first..end-1 are scored."""
    if n < 2:
        raise InputError(f"the text has {n} token(s); perplexity needs at least 2")
    if not 1 <= stride < window:
        raise InputError(f"stride={stride} must be at least 1 and below window={window} (each window keeps "
                         "window - stride tokens of context)")
    out = [(0, 1, min(window, n))]
    j = 1
    while j * stride + window - stride < n:
        start = j * stride
        out.append((start, start + window - stride, min(start + window, n)))
        j += 1
    return out


def perplexity(step: StepFn, make_cache: MakeCache, ids, *,
               window: int, stride: int, batch: int = 8,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `ids` ([N] int64, numpy or tensor) under `step`; `make_cache(b, capacity)` gives an
    empty cache for b rows. Each window is a scoring request (`Request.scoring`: its context, then its
    scored tokens fed one per step) on an engine of `batch` slots that this function drives.

    `progress(done, total)` is called as windows finish, in windows."""
    if batch < 1:
        raise InputError(f"batch={batch} must be at least 1")
    t0 = time.perf_counter()
    ids = np.asarray(ids, dtype=np.int64)
    windows = plan_windows(ids.size, window, stride)
    engine = Engine(Ranks([step], [make_cache], slots=batch, capacity=window), vocab_size=None, slots=batch,
                    capacity=window, prefill_tokens=batch * window, background=False)
    handles = [engine.submit(Request.scoring(ids[s:f], ids[f:e])) for s, f, e in windows]
    more, done = True, 0
    while more:
        more = engine.step()
        if progress is not None and engine.completed > done:
            done = engine.completed
            progress(done, len(windows))
    nll = -sum(sum(h.result(timeout=0).logprobs) for h in handles)
    return Perplexity(tokens=ids.size, scored=ids.size - 1, nll=nll, window=window, stride=stride,
                      seconds=time.perf_counter() - t0)


# ---- `llama-export eval` ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    """One `eval`: a text file scored by one model source at one TP degree."""

    source: ModelSource
    text: Path
    tp: int = 1
    window: int | None = None  # default: the model's max_seq_len
    stride: int | None = None  # default: window // 2
    batch: int = 8
    device: str = "cpu"
    progress: bool = True
    threads: int | None = None  # CPU threads per rank (None: `runner.threads.rank_threads` decides)


def _read_ids(opts: EvalOptions, source: ResolvedSource) -> np.ndarray:
    path = Path(opts.text)
    if not path.is_file():
        raise InputError(f"--text {path} does not exist; give a UTF-8 text file")
    ids = source.tokenizer.encode(read_user_text(path, "--text"))  # one stream, BOS first
    return np.array(ids, dtype=np.int64)


def _window(opts: EvalOptions, max_seq_len: int) -> tuple[int, int]:
    window = opts.window or max_seq_len
    if window > max_seq_len:
        raise InputError(f"--window {window} exceeds the model's context max_seq_len={max_seq_len}; use "
                         f"--window {max_seq_len} or less")
    stride = opts.stride or max(1, window // 2)
    plan_windows(2, window, stride)  # checks stride against window
    return window, stride


@dataclass(frozen=True)
class EvalPlan:
    """What is resolved and validated once for every rank (`plan_eval`; the launcher hands it to its
    ranks in the run folder, `env.read_handoff`): the text's token ids and the windows."""

    ids: tuple[int, ...]
    window: int
    stride: int


def plan_eval(opts: EvalOptions, source: ResolvedSource) -> EvalPlan:
    """Check the TP degree and the windows, and tokenize the text."""
    source.check_tp(opts.tp)
    cfg = source.config
    check_tp(cfg, opts.tp)
    window, stride = _window(opts, cfg.max_seq_len)
    ids = _read_ids(opts, source)
    plan_windows(ids.size, window, stride)
    return EvalPlan(ids=tuple(ids.tolist()), window=window, stride=stride)


def run_eval(opts: EvalOptions, argv: list[str], report: Callable[[Perplexity], None]) -> int:
    """Entry point of the `eval` subcommand (parent or rank process); rank 0 calls `report`."""
    source = opts.source.resolve()
    plan = plan_once(EvalPlan, lambda: plan_eval(opts, source), first=opts.source.check_runs_alone)

    def work(env, comm, device: str, threads: int) -> int:
        step, make_cache, _ = source.step(comm=comm, device=device, threads=threads)
        ids = np.array(plan.ids, dtype=np.int64)
        bar = count_bar(len(plan_windows(ids.size, plan.window, plan.stride)), "eval", unit="window",
                        enabled=opts.progress and env.rank == 0)
        result = perplexity(step, make_cache, ids, window=plan.window, stride=plan.stride, batch=opts.batch,
                            progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
        if env.rank == 0:
            report(result)
        return 0

    return on_ranks(opts.tp, opts.device, argv, work, threads=opts.threads, handoff=plan)
