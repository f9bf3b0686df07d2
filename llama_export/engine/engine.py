"""A long-lived engine: opened once, it keeps the model's ranks and a KV cache of row slots, and serves
requests submitted at any time from any thread, batched step by step (continuous batching).

    submit() ──► waiting ──► slot (admitted when one is free)
                              │ prefill: the prompt in chunks, at most `prefill_tokens` per step
                              ▼
                             decode: one token per active row per step, every active row in one call
                              │ max_tokens, a stop id or a stop string
                              ▼
                             finished (the slot is free for the next request)

Each step of the loop: admit waiting requests into free slots (those admitted together in ascending
prompt length, so that rows of similar length sit side by side); prefill chunks of admitted prompts,
several rows per call (`_prefill`: runs of neighbouring slots, padded to their longest chunk, grouped by
`generate.prefill_groups`); then one decode call for the slots that are generating. Decode rows do not
join a prefill call (as llama.cpp's do): a call computes its longest row's length for every row, so a
decode row in a call of 128-token chunks costs 128 tokens of compute instead of 1. Measured on the 134M
fp32 model (ONNX Runtime, 2 threads): 2 rows x 128 prefill + 8 decode rows, 1.45 s as two calls vs
5.93 s as one; 1 x 32 + 16 decode rows, 0.71 vs 2.32 s; 1 x 64 + 4, 0.66 vs 1.58 s. The cache is
`[slots, kv_heads, capacity, head_dim]` per layer and rank, allocated once; a slot's row is written in
place at that row's own positions (`artifact/schema.py`), so requests of any length share it.

A request draws its tokens from its own generator (seeded by its `seed`) from its own row's logits, so
what it generates does not depend on what else is in the batch; greedy requests give the ids of a run
of that prompt alone.

The loop runs on a thread of its own (`background=True`, the server's and the Python API's engine), or
is driven by its caller (`background=False`: `step()` / `run_all()`), which is how `run`'s rank
processes use it: every rank builds the engine over its own step function (its collectives inside the
step), submits the same requests in the same order and steps in lockstep. The schedule depends only on
the requests and the sampled ids, which every rank draws alike from identical (all-gathered) logits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llama_export.engine.generate import (
    SamplingConfig,
    check_finite,
    log_softmax,
    prefill_groups,
    run_rows,
    sample,
    validate_prompt,
)
from llama_export.errors import InputError, LlamaExportError
from llama_export.runner.step import MakeCache, StepFn, host

if TYPE_CHECKING:
    from llama_export.runner.source import ResolvedSource

log = logging.getLogger(__name__)

STOP = "stop"  # finish reasons, as OpenAI's API names them
LENGTH = "length"
CANCELLED = "cancelled"  # `Engine.cancel`: the caller went away (a client that disconnected)


@dataclass(frozen=True)
class Request:
    """One generation: prompt ids, how many tokens at most, how to sample, when to stop."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()  # stop strings (need the model's tokenizer); the text ends before them
    logits: bool = False  # the completion keeps each generated token's logits (`Completion.logits`)
    # Tokens to score instead of generating (`Request.scoring`): each is taken as the next token, in
    # place of a sampled one, and its log-probability is kept (`Completion.logprobs`)
    score: tuple[int, ...] = ()

    @classmethod
    def scoring(cls, prompt: Sequence[int], continuation: Sequence[int]) -> Request:
        """log p(continuation | prompt), token by token (perplexity; OpenAI's echo + logprobs): a
        request whose new tokens are `continuation`, no stop."""
        return cls(prompt=tuple(int(t) for t in prompt), max_tokens=len(continuation),
                   score=tuple(int(t) for t in continuation))


@dataclass
class Completion:
    """What a request produced: the ids (a stop id included, as `run --json` records it), the text
    (without the stop id or stop string; None without a tokenizer) and why it ended."""

    prompt: tuple[int, ...]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = LENGTH
    logits: list[np.ndarray] | None = None  # `[vocab]` fp32 per generated token, when the request asked
    logprobs: list[float] | None = None  # a scoring request's: log p(token) per scored token (float64)


class Handle:
    """A submitted request: iterate it for its tokens as they come, `(id, text delta)` (the last item
    may be `(None, text)`: text held back until the end), or wait for its `result()`.

    Tokens go through a queue that only an iterating reader wakes on; `result()` waits for the end
    alone, so a caller that only wants the completion is not woken once per token."""

    _END = object()  # the queue's last item

    def __init__(self, request: Request) -> None:
        self.request = request
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()
        self._done: Completion | None = None
        self._error: BaseException | None = None
        self.cancelled = False  # set by `Engine.cancel`
        self.index = 0  # submitted as the engine's index-th request (from 0; names it in errors)

    def __iter__(self) -> Iterator[tuple[int | None, str]]:
        while (item := self._tokens.get()) is not Handle._END:
            yield item
        if self._error is not None:
            raise self._error

    def poll(self) -> list[tuple[int | None, str]]:
        """The tokens produced since the last poll, without waiting (for a caller that drives the
        engine itself, `Engine.step`); the end is `finished`/`result()`."""
        got = []
        while True:
            try:
                item = self._tokens.get_nowait()
            except queue.Empty:
                break
            if item is Handle._END:
                self._tokens.put(item)  # still the last item, for an iterating reader
                break
            got.append(item)
        return got

    @property
    def finished(self) -> bool:
        """The request has ended (its completion or an error is there to read)."""
        return self._ended.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once finished; raises what ended the engine, or TimeoutError."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._done

    # the engine's side
    def _token(self, token: int | None, text: str) -> None:
        self._tokens.put((token, text))

    def _end(self, done: Completion | None = None, error: BaseException | None = None) -> None:
        self._done, self._error = done, error
        self._ended.set()
        self._tokens.put(Handle._END)


class Ranks:
    """The model's ranks in this process, each with its step function and its own slot cache; a call
    runs every rank's step on the same inputs (in threads when there are several: their collectives
    meet in a `ThreadGroup`) and returns the logits, which every rank holds alike."""

    def __init__(self, steps: Sequence[StepFn], make_caches: Sequence[MakeCache], *, slots: int,
                 capacity: int, group=None) -> None:
        if len(steps) > 1 and group is None:
            raise ValueError("several ranks need the ThreadGroup their communicators belong to")
        self.steps = list(steps)
        self.caches = [make(slots, capacity) for make in make_caches]
        self.group = group

    def __call__(self, tokens: np.ndarray, cached: np.ndarray, lengths: np.ndarray, rows: slice) -> np.ndarray:
        def one(rank: int, _comm=None):
            keys, values = self.caches[rank]
            return run_rows(self.steps[rank], tokens, cached, lengths, keys, values, rows)

        if self.group is None:
            return host(one(0))
        return host(self.group.run(one)[0])


@dataclass
class _Live:
    """A request in a slot."""

    handle: Handle
    slot: int
    rng: np.random.Generator
    prefilled: int = 0  # prompt tokens in the cache
    out: list[int] = field(default_factory=list)
    stream: object | None = None  # TextStream, with a tokenizer
    text: str = ""
    logits: list[np.ndarray] = field(default_factory=list)  # per generated token, when the request asks
    logprobs: list[float] = field(default_factory=list)  # per scored token, for a scoring request

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return bool(self.out)

    @property
    def cached(self) -> int:
        """Tokens in this row's cache: the prompt and every generated token but the last."""
        return self.prefilled + max(0, len(self.out) - 1)


class Engine:
    """Serves requests on one model, batched step by step (see the module docstring).

    `ranks`: the model (`Ranks`); `vocab_size` from its config (None: ids are not checked against it);
    `slots` rows of KV cache of `capacity` tokens each (a request's prompt + max_tokens must fit one);
    `prefill_tokens`: prompt tokens prefilled per step at most, so that running requests keep getting
    tokens while long prompts come in; `tokenizer`: for text prompts, text output and stop strings (optional);
    `background`: the loop runs on a thread of its own, else the caller drives it (`step`, `run_all`)."""

    def __init__(self, ranks: Ranks, *, vocab_size: int | None, slots: int, capacity: int, prefill_tokens: int = 256,
                 tokenizer=None, on_error: Callable[[BaseException], None] | None = None,
                 background: bool = True) -> None:
        if slots < 1 or capacity < 2 or prefill_tokens < 1:
            raise InputError(f"slots={slots}, capacity={capacity}, prefill_tokens={prefill_tokens}: need at "
                             "least 1 slot, 2 tokens of capacity and 1 prefill token per step")
        self.ranks = ranks
        self.vocab_size = vocab_size
        self.slots = slots
        self.capacity = capacity
        self.prefill_tokens = prefill_tokens
        self.tokenizer = tokenizer
        self._on_error = on_error
        self._waiting: list[Handle] = []
        self._submitted = 0
        self._live: dict[int, _Live] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._failed: BaseException | None = None
        self.steps = 0  # loop iterations that ran a forward (for tests and metrics)
        self.completed = 0  # requests that have finished (cancelled ones included)
        self.prefill_calls = 0  # forwards that prefilled prompt chunks (several rows each where it can)
        self.prefill_s = 0.0  # seconds in prefill forwards and their first tokens' sampling
        self.decode_s = 0.0  # seconds in decode forwards and their sampling
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="llama_export-engine", daemon=True)
            self._thread.start()

    # ---- the API ----------------------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Queue `request` (thread-safe); refused at once if it can never run (one clear error)."""
        validate_prompt(np.asarray([request.prompt], dtype=np.int64), vocab_size=self.vocab_size,
                        max_seq_len=self.capacity, max_new_tokens=request.max_tokens,
                        limit_name=f"of a slot ({self.capacity} tokens, the engine's cache capacity)")
        if request.score and (len(request.score) != request.max_tokens or request.stop or request.stop_ids):
            raise InputError("a scoring request scores exactly its tokens, without stops (`Request.scoring`)")
        if request.stop and self.tokenizer is None:
            raise InputError("stop strings need the model's tokenizer; pass stop ids instead")
        handle = Handle(request)
        with self._cond:
            if self._failed is not None:
                raise LlamaExportError(f"the engine stopped after an error: {self._failed}")
            if self._closing:
                raise InputError("the engine is closed")
            handle.index = self._submitted
            self._submitted += 1
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def generate(self, prompts: Sequence[Sequence[int] | str], *, max_tokens: int = 16,
                 sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
                 stop_ids: Sequence[int] | None = None) -> list[Completion]:
        """Completions of `prompts` (ids, or text with a tokenizer), all submitted at once."""
        handles = [self.submit(self.request(p, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                            stop_ids=stop_ids)) for p in prompts]
        return [h.result() for h in handles]

    def stream(self, prompt: Sequence[int] | str, *, max_tokens: int = 16,
               sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
               stop_ids: Sequence[int] | None = None) -> Iterator[tuple[int | None, str]]:
        """`(token id, text delta)` as each token is generated (the delta is "" without a tokenizer; see
        `Handle`)."""
        yield from self.submit(self.request(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                            stop_ids=stop_ids))

    def chat(self, messages, *, max_tokens: int = 16, sampling: SamplingConfig = SamplingConfig(),
             stop: Sequence[str] = ()) -> Completion:
        """The assistant's reply to `messages` (`[{"role", "content"}]`, the model's chat template)."""
        if self.tokenizer is None:
            raise InputError("chat needs the model's tokenizer and chat template")
        return self.submit(self.request(self.tokenizer.chat(messages), max_tokens=max_tokens, sampling=sampling,
                                        stop=stop)).result()

    def request(self, prompt: Sequence[int] | str, *, max_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> Request:
        """A `Request` of `prompt` (text is tokenized; stop ids default to the tokenizer's)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs the model's tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt)
        if stop_ids is None:
            stop_ids = self.tokenizer.stop_ids if self.tokenizer is not None else ()
        return Request(prompt=tuple(int(t) for t in prompt), max_tokens=max_tokens, sampling=sampling,
                       stop_ids=frozenset(int(t) for t in stop_ids), stop=tuple(stop))

    def on_error(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (on the engine's thread) if the engine stops after an error."""
        self._on_error = callback

    def cancel(self, handle: Handle) -> None:
        """End `handle`'s request (thread-safe): a waiting one is dropped, a running one frees its slot
        before the next step; its result is what it produced so far, finish reason "cancelled"."""
        with self._cond:
            handle.cancelled = True
            self._cond.notify()

    def step(self) -> bool:
        """One iteration of the loop on the caller's thread (an engine made with `background=False`):
        admit, prefill, decode. Returns whether requests remain; an error propagates to the caller."""
        if self._thread is not None:
            raise RuntimeError("this engine runs its own loop; step() is for an engine made with background=False")
        with self._cond:
            self._drop_cancelled()
            self._admit()
        if self._live:
            self._step()
        return bool(self._live or self._waiting)

    def run_all(self, requests: Sequence[Request]) -> list[Completion]:
        """Submit `requests` in order and step until every one has finished (`background=False`):
        deterministic, so that ranks driving engines of their own in lockstep take the same steps."""
        handles = [self.submit(r) for r in requests]
        while self.step():
            pass
        return [h.result(timeout=0) for h in handles]

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish the ones submitted, and stop the loop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            while self.step():
                pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def failed(self) -> BaseException | None:
        """What stopped the engine, or None while it serves."""
        return self._failed

    @property
    def active(self) -> int:
        """Requests in slots now."""
        return len(self._live)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._live and not self._closing:
                        self._cond.wait()
                    if self._closing and not self._waiting and not self._live:
                        return
                    self._drop_cancelled()
                    self._admit()
                if self._live:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - handed to every caller waiting on the engine
            self._fail(e)

    def _drop_cancelled(self) -> None:
        """Requests cancelled since the last step end now (their slots are free for `_admit`)."""
        for h in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(h)
            self.completed += 1
            h._end(Completion(prompt=h.request.prompt, finish_reason=CANCELLED))
        for live in [x for x in self._live.values() if x.handle.cancelled]:
            self._finish(live, CANCELLED, locked=True)

    def _admit(self) -> None:
        """Waiting requests into free slots, first come first served; those admitted together take the
        lowest free slots in ascending prompt length (neighbours of similar length share prefill calls).
        A request for no tokens ends here."""
        free = [s for s in range(self.slots) if s not in self._live]  # ascending: active rows stay packed
        admitted = []
        while len(admitted) < len(free) and self._waiting:
            handle = self._waiting.pop(0)
            if handle.request.max_tokens == 0:
                self.completed += 1
                handle._end(Completion(prompt=handle.request.prompt, logits=[] if handle.request.logits else None))
            else:
                admitted.append(handle)
        for handle, slot in zip(sorted(admitted, key=lambda h: len(h.request.prompt)), free):
            live = _Live(handle, slot, np.random.default_rng(handle.request.sampling.seed))
            if self.tokenizer is not None:
                from llama_export.text import TextStream

                tok = self.tokenizer
                live.stream = TextStream(lambda ids: tok.decode(ids, skip_special=True))
            self._live[slot] = live

    def _step(self) -> None:
        chunks, budget = [], self.prefill_tokens
        for live in sorted(self._live.values(), key=lambda x: x.slot):
            if not live.decoding and budget > 0:
                n = min(budget, len(live.request.prompt) - live.prefilled)
                chunks.append((live, n))
                budget -= n
        if chunks:
            t0 = time.perf_counter()
            self._prefill(chunks)
            self.prefill_s += time.perf_counter() - t0
        decoding = sorted((x for x in self._live.values() if x.decoding), key=lambda x: x.slot)
        if decoding:
            t0 = time.perf_counter()
            self._decode(decoding)
            self.decode_s += time.perf_counter() - t0
        self.steps += 1

    def _prefill(self, chunks: list[tuple[_Live, int]]) -> None:
        """Prefill each `(row, n)`: the next n tokens of its prompt, rows in ascending slot order. Rows in
        neighbouring slots share calls (right-padded to the call's longest chunk, `generate.prefill_groups`
        choosing where to cut); a chunk that ends its prompt samples the first token."""
        runs, start = [], 0  # maximal runs of consecutive slots: a call covers one slice of the cache
        for i in range(1, len(chunks) + 1):
            if i == len(chunks) or chunks[i][0].slot != chunks[i - 1][0].slot + 1:
                runs.append(chunks[start:i])
                start = i
        for run in runs:
            for a, b in prefill_groups(np.array([n for _, n in run], dtype=np.int64)):
                self._prefill_call(run[a:b])

    def _prefill_call(self, group: list[tuple[_Live, int]]) -> None:
        width = max(n for _, n in group)
        tokens = np.zeros((len(group), width), dtype=np.int64)
        for r, (live, n) in enumerate(group):
            tokens[r, :n] = live.request.prompt[live.prefilled:live.prefilled + n]
        cached = np.array([live.prefilled for live, _ in group], dtype=np.int64)
        lengths = np.array([n for _, n in group], dtype=np.int64)
        first = group[0][0].slot
        logits = self.ranks(tokens, cached, lengths, slice(first, first + len(group)))
        self.prefill_calls += 1
        for r, (live, n) in enumerate(group):
            live.prefilled += n
            if live.prefilled == len(live.request.prompt):
                self._emit(live, logits[r])

    def _decode(self, decoding: list[_Live]) -> None:
        """One token for every decoding row, in one call over the slots from the first decoding row to
        the last; a row in between that is not decoding is computed on a dummy token written where it
        does no harm (a free row's position 0; a prefilling row's next position, which its next chunk
        overwrites)."""
        lo, hi = decoding[0].slot, decoding[-1].slot + 1
        n = hi - lo
        tokens = np.zeros((n, 1), dtype=np.int64)
        cached = np.zeros(n, dtype=np.int64)
        for s in range(lo, hi):
            live = self._live.get(s)
            if live is not None:
                cached[s - lo] = live.cached if live.decoding else live.prefilled
                tokens[s - lo, 0] = live.out[-1] if live.decoding else 0
        logits = self.ranks(tokens, cached, np.ones(n, dtype=np.int64), slice(lo, hi))
        for live in decoding:
            self._emit(live, logits[live.slot - lo])

    def _emit(self, live: _Live, logits: np.ndarray) -> None:
        """Sample `live`'s next token from its row's logits, hand it over, and end it if it is done."""
        check_finite(logits[None, :], lambda _: _where(live))
        if live.request.score:
            token = live.request.score[len(live.out)]
            live.logprobs.append(float(log_softmax(logits)[token]))
        else:
            token = int(sample(logits[None, :], live.request.sampling, live.rng)[0])
        live.out.append(token)
        if live.request.logits:
            live.logits.append(np.array(logits, dtype=np.float32))
        req = live.request
        finished = STOP if token in req.stop_ids else None
        shown = len(live.text)
        if live.stream is not None and finished is None:
            live.text += live.stream.push([token])
            cut = _first_stop(live.text, req.stop) if req.stop else None
            if cut is not None:
                live.text = live.text[:cut]
                finished = STOP
        live.handle._token(token, live.text[shown:])
        if finished is None and len(live.out) >= req.max_tokens:
            finished = LENGTH
        if finished is None and live.cached >= self.capacity:
            finished = LENGTH  # the row is full (cannot happen for a request that passed `submit`)
        if finished is not None:
            self._finish(live, finished)

    def _finish(self, live: _Live, reason: str, *, locked: bool = False) -> None:
        if live.stream is not None and reason == LENGTH:
            rest = live.stream.finish()  # an unfinished character held back at the end
            if rest:
                live.text += rest
                live.handle._token(None, rest)
        done = Completion(prompt=live.request.prompt, tokens=list(live.out),
                          text=live.text if live.stream is not None else None, finish_reason=reason,
                          logits=live.logits if live.request.logits else None,
                          logprobs=live.logprobs if live.request.score else None)
        if locked:
            del self._live[live.slot]
        else:
            with self._cond:
                del self._live[live.slot]
        self.completed += 1
        live.handle._end(done)

    def _fail(self, error: BaseException) -> None:
        log.debug("the engine stopped: %s", error)  # the callers get the error itself
        with self._cond:
            self._failed = error
            handles = [x.handle for x in self._live.values()] + self._waiting
            self._live.clear()
            self._waiting.clear()
        for h in handles:
            h._end(error=error)
        if self._on_error is not None:
            self._on_error(error)


def _where(live: _Live) -> str:
    """Where a request's logits were computed, for a message: `in decode step 3 of request 1`."""
    if live.request.score:
        return f"in scoring request {live.handle.index}, predicting its continuation's token {len(live.out) + 1}"
    return f"in {f'decode step {len(live.out)}' if live.out else 'the prefill'} of request {live.handle.index}"


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of `stops` begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def open_engine(source: ResolvedSource, *, tp: int = 1, slots: int = 8, capacity: int | None = None,
                prefill_tokens: int = 256, device: str = "cpu", threads: int | None = None) -> Engine:
    """An engine on `source` (a `runner.source.ResolvedSource`, `ModelSource.resolve()`: a checkpoint,
    an export or engines, read once and shared with whoever else asks it) at TP `tp`, its ranks as
    threads of this process (their collectives in a `ThreadGroup`); `capacity` tokens per slot (default
    the model's max_seq_len), `threads` CPU threads (default: the cores other processes leave free).
    The tokenizer comes along where the model has one."""
    from llama_export.parallel.comm import LocalComm, ThreadGroup
    from llama_export.parallel.plan import check_tp
    from llama_export.runner.threads import rank_threads

    source.source.check_runs_alone()
    cfg = source.config
    source.check_tp(tp)
    check_tp(cfg, tp)
    capacity = min(cfg.max_seq_len, capacity or cfg.max_seq_len)
    threads = rank_threads(threads, 1)
    group = ThreadGroup(tp) if tp > 1 else None
    built = [source.step(comm=group.comm(r) if group else LocalComm(), device=device, threads=threads)
             for r in range(tp)]
    ranks = Ranks([b[0] for b in built], [b[1] for b in built], slots=slots, capacity=capacity, group=group)
    try:
        tokenizer = source.tokenizer
    except InputError:  # no tokenizer files: ids in, ids out
        tokenizer = None
    return Engine(ranks, vocab_size=cfg.vocab_size, slots=slots, capacity=capacity, prefill_tokens=prefill_tokens,
                  tokenizer=tokenizer)
