"""`llama-export run`: generation across N rank processes on any backend.

The parent process resolves the model source once and checks everything it can cheaply (config, TP
degree, prompts, KV cache capacity): the result is a `RunPlan`. It then either runs rank 0 itself
(tp=1, on the same resolved source) or starts the rank processes (`launch.launch_local`) and hands them
the plan through the run folder, so that they neither tokenize nor validate again (only rank 0 loads
the tokenizer, to print text); under torchrun each rank plans for itself. Each rank builds its step
function for the chosen backend and drives the engine over it (`engine.Engine`, `background=False`: the
one generation loop, also `serve`'s) in lockstep with the other ranks; rank 0 reports.
All prompts run as one batch (one forward per decode step), whatever their lengths; the prefill groups
rows of similar length (`generate.prefill_groups`); a prompt's row ends at its stop id.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from llama_export.errors import InputError
from llama_export.files import write_json
from llama_export.parallel.comm import Communicator
from llama_export.parallel.plan import check_tp
from llama_export.engine.engine import Engine, Ranks, Request
from llama_export.engine.batch import GenerationResult, steps_of
from llama_export.engine.generate import SamplingConfig, pad_prompts, validate_prompt
from llama_export.runner.env import RankEnv, plan_once, seconds_since_start
from llama_export.runner.launch import on_ranks
from llama_export.runner.source import ModelSource, ResolvedSource
from llama_export.text import TextStream, Tokenizer, single_turn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """One `run`: the model source, the TP degree, the prompts and how to generate."""

    source: ModelSource
    tp: int
    max_new_tokens: int = 32
    prompt_ids: tuple[tuple[int, ...], ...] | None = None
    prompts: tuple[str, ...] | None = None
    chat: str | None = None  # a user message, formatted with the model's chat template
    system: str | None = None  # the system message of a chat
    sampling: SamplingConfig = SamplingConfig()
    json_out: Path | None = None
    logits: bool = False  # `json_out` also holds every step's full last-token logits (vocab floats per row)
    device: str = "cpu"
    stream: bool = True
    threads: int | None = None  # CPU threads per rank (None: this machine's cores / tp, `rank_threads`)
    # KV cache tokens per row; None: the longest prompt + max_new_tokens. Either way at most the model's
    # max_seq_len, which is the context limit.
    cache_capacity: int | None = None
    progress: bool = True  # rank 0 shows start-up progress (hashing) when stderr is a terminal

    @property
    def is_text(self) -> bool:
        """Text in (prompts or chat) and out, through the model's tokenizer; else `prompt_ids`."""
        return self.prompts is not None or self.chat is not None

    def context_limit(self, max_seq_len: int) -> int:
        """Tokens a row may hold: the model's max_seq_len, or the smaller cache capacity asked for."""
        if self.cache_capacity is not None and not 1 <= self.cache_capacity:
            raise InputError(f"--cache-capacity {self.cache_capacity} must be >= 1")
        return min(max_seq_len, self.cache_capacity or max_seq_len)


def parse_prompt_ids(text: str) -> tuple[tuple[int, ...], ...]:
    """'1,2,3' -> ((1, 2, 3),); rows of a batch are separated by ';' and may differ in length."""
    try:
        rows = tuple(tuple(int(t) for t in row.split(",") if t.strip()) for row in text.split(";"))
    except ValueError:
        raise InputError(f"--prompt-ids {text!r} must be comma-separated integers (rows separated by ';')") from None
    if bad := [t for row in rows for t in row if not 0 <= t < 1 << 31]:
        raise InputError(f"--prompt-ids: {bad[0]} is not a token id (ids are >= 0 and below the vocabulary size)")
    return rows


def new_token_budget(opts: RunOptions, prompt_len: int, limit: int) -> int:
    """Tokens to generate. Text generation stops at the context limit (a prompt that alone fills the
    context is an error); `--prompt-ids` runs must fit exactly (`validate_prompt` refuses them)."""
    if not opts.is_text or prompt_len >= limit:
        return opts.max_new_tokens
    return min(opts.max_new_tokens, limit - prompt_len)


def _check_prompts(opts: RunOptions, rows: list[list[int]], cfg) -> int:
    """Validate every row against the vocabulary and the context limit; returns the new-token budget."""
    limit = opts.context_limit(cfg.max_seq_len)
    longest = max(len(r) for r in rows)
    budget = new_token_budget(opts, longest, limit)
    for r in rows:
        validate_prompt(np.array([r], dtype=np.int64), vocab_size=cfg.vocab_size, max_seq_len=limit,
                        max_new_tokens=budget, limit_name=_limit_name(opts, cfg.max_seq_len))
    return budget


def _limit_name(opts: RunOptions, max_seq_len: int) -> str:
    if opts.cache_capacity is not None and opts.cache_capacity < max_seq_len:
        return f"--cache-capacity {opts.cache_capacity}"
    return f"max_seq_len={max_seq_len}"


@dataclass(frozen=True)
class RunPlan:
    """What is resolved and validated once for every rank (`plan_run`; the launcher hands it to its
    ranks in the run folder, `env.read_handoff`)."""

    prompt_ids: tuple[tuple[int, ...], ...]  # the prompts' token ids, one row each (unpadded)
    max_new_tokens: int  # the run's budget: --max-new-tokens, cut at the context limit for text
    capacity: int  # KV cache tokens per row
    stop_ids: tuple[int, ...]  # the tokenizer's (none for --prompt-ids runs)
    context_limit: str  # how to name the context limit: "max_seq_len=N" / "--cache-capacity N"


def plan_run(opts: RunOptions, source: ResolvedSource) -> RunPlan:
    """Check the TP degree and the prompts (tokenized where they are text) against the model."""
    source.check_tp(opts.tp)
    cfg = source.config
    check_tp(cfg, opts.tp)
    tok = source.tokenizer if opts.is_text else None
    limit, limit_name = opts.context_limit(cfg.max_seq_len), _limit_name(opts, cfg.max_seq_len)
    for text in opts.prompts or ():  # a prompt that cannot fit is refused before it is tokenized
        tok.check_fits(text, limit=limit, limit_name=limit_name)
    rows = _prompt_rows(opts, tok)
    budget = _check_prompts(opts, rows, cfg)
    return RunPlan(
        prompt_ids=tuple(tuple(r) for r in rows), max_new_tokens=budget,
        capacity=min(opts.context_limit(cfg.max_seq_len), max(len(r) for r in rows) + budget),
        stop_ids=tuple(sorted(tok.stop_ids)) if tok is not None else (),
        context_limit=limit_name,
    )


def run(opts: RunOptions, argv: list[str], reporter: Reporter | None = None) -> int:
    """Entry point of the `run` subcommand, in the parent process or in a rank process.

    `argv` is what rank processes are started with; `reporter` receives rank 0's output."""
    source = opts.source.resolve()
    plan = plan_once(RunPlan, lambda: plan_run(opts, source), first=opts.source.check_runs_alone)
    work = functools.partial(_run_rank, opts, source, plan, reporter or _Silent())
    return on_ranks(opts.tp, opts.device, argv, work, threads=opts.threads, handoff=plan)


def _prompt_rows(opts: RunOptions, tok: Tokenizer | None) -> list[list[int]]:
    """The prompts' token ids, one list per row (rows may differ in length); a chat is one row (the
    model's chat template applied)."""
    if opts.prompt_ids is not None:
        return [list(r) for r in opts.prompt_ids]
    if opts.chat is not None:
        if not opts.chat.strip():
            raise InputError("the chat message is empty; give some text with --chat")
        return [tok.chat(single_turn(opts.chat, system=opts.system))]
    rows = [tok.encode(p) for p in opts.prompts or ()]
    if not rows or any(len(r) == 0 for r in rows) or any(not p.strip() for p in opts.prompts or ()):
        raise InputError("the prompt is empty; give some text with --prompt")
    return rows


@dataclass(frozen=True)
class RunSummary:
    """What rank 0 reports when generation ends."""

    prompts: tuple[str, ...] | None  # text prompts (a chat: its user message), or None for --prompt-ids runs
    texts: tuple[str, ...]  # generated text per prompt, up to its stop token ("" for --prompt-ids runs)
    tokens: tuple[tuple[int, ...], ...]  # generated token ids per prompt (all of them, stop tokens included)
    prompt_tokens: int  # all prompts together
    new_tokens: int  # decode steps + 1
    prefill_tok_s: float
    decode_tok_s: float
    streamed: bool  # the text of prompt 0 was already passed to `Reporter.text`
    echo_prompt: bool  # the output shows the prompt before the generated text (not for a chat)
    context_limit: str | None  # "max_seq_len=N" / "--cache-capacity N", when generation stopped there
    first_token_s: float | None = None  # seconds from the command's start to the first new token (Linux)


class Reporter(Protocol):
    """Where rank 0's output goes (the CLI prints it; the library never does)."""

    def text(self, delta: str) -> None: ...

    def finish(self, opts: RunOptions, summary: RunSummary) -> None: ...


class _Silent:
    def text(self, delta: str) -> None:
        pass

    def finish(self, opts: RunOptions, summary: RunSummary) -> None:
        pass


def _run_rank(opts: RunOptions, source: ResolvedSource, plan: RunPlan, reporter: Reporter,
              env: RankEnv, comm: Communicator, device: str, threads: int) -> int:
    """One rank's generation (`launch.RankWork`, the first four arguments bound): the engine over this
    rank's step function, driven here; every rank submits the same requests and steps in lockstep."""
    tok = source.tokenizer if opts.is_text and env.rank == 0 else None  # only rank 0 shows text
    step, make_cache, _ = source.step(comm=comm, device=device, threads=threads,
                                      progress=opts.progress and env.rank == 0)
    rows = [list(r) for r in plan.prompt_ids]
    echo = opts.prompts is not None
    stream = TextStream(tok.decode) if tok is not None and opts.stream and len(rows) == 1 else None
    if stream is not None and echo:
        reporter.text(opts.prompts[0])
    # One throw-away step first, so that the reported prefill time is not the first call's set-up
    # (kernel selection, allocator warm-up, lazy initialisation), on a cache of its own.
    one = np.ones(1, dtype=np.int64)
    step(np.array([rows[0][:1]], dtype=np.int64), one - 1, one, *make_cache(1, 1))
    # Every row in a slot of its own and every prompt prefilled in the first step, as one batch.
    engine = Engine(Ranks([step], [make_cache], slots=len(rows), capacity=plan.capacity),
                    vocab_size=source.config.vocab_size, slots=len(rows), capacity=plan.capacity,
                    prefill_tokens=sum(len(r) for r in rows), background=False)
    handles = [engine.submit(Request(tuple(r), max_tokens=plan.max_new_tokens, sampling=opts.sampling,
                                     stop_ids=frozenset(plan.stop_ids), logits=opts.logits)) for r in rows]
    first_token_s = None

    def show() -> None:  # prompt 0's new text (its stop id ends its request: nothing follows it)
        for token, _ in handles[0].poll() if stream is not None else ():
            if token not in tok.stop_ids and (delta := stream.push([token])):
                reporter.text(delta)

    more = True
    while more:
        more = engine.step()
        if first_token_s is None and engine.prefill_s and (since := seconds_since_start()) is not None:
            first_token_s = since - engine.decode_s  # the first step prefilled every prompt, then decoded once
        show()
    done = [h.result(timeout=0) for h in handles]
    if stream is not None and (rest := stream.finish()):
        reporter.text(rest)
    if env.rank == 0:
        tokens = [c.tokens for c in done]
        prompt, lengths = pad_prompts(rows)
        result = GenerationResult(prompt=prompt, prompt_lengths=lengths, tokens=tokens,
                                  steps=steps_of(tokens, [c.logits for c in done] if opts.logits else None),
                                  prefill_s=engine.prefill_s, decode_s=engine.decode_s)
        _report(opts, plan, result, reporter, tok=tok, streamed=stream is not None, first_token_s=first_token_s)
    return 0


def _report(opts: RunOptions, plan: RunPlan, result: GenerationResult, reporter: Reporter, *,
            tok: Tokenizer | None, streamed: bool, first_token_s: float | None) -> None:
    """Rank 0: the --json file and the summary."""
    rows = [list(r) for r in plan.prompt_ids]
    if opts.json_out is not None:
        _write_json(opts, result, rows, first_token_s)
    texts = [tok.decode(tok.until_stop(ids)) for ids in result.tokens] if tok is not None else [""] * len(rows)
    n_new = len(result.steps)
    prompt_tokens = int(result.prompt_lengths.sum())
    decoded = sum(max(0, len(t) - 1) for t in result.tokens)
    reporter.finish(opts, RunSummary(
        prompts=opts.prompts if opts.chat is None else (opts.chat,), texts=tuple(texts),
        tokens=tuple(tuple(row) for row in result.tokens),
        prompt_tokens=prompt_tokens, new_tokens=n_new,
        prefill_tok_s=prompt_tokens / result.prefill_s if result.prefill_s else 0.0,
        decode_tok_s=decoded / result.decode_s if result.decode_s else 0.0,
        streamed=streamed, echo_prompt=opts.prompts is not None,
        context_limit=plan.context_limit if plan.max_new_tokens < opts.max_new_tokens and n_new == plan.max_new_tokens
        else None,
        first_token_s=first_token_s,
    ))


def _write_json(opts: RunOptions, result: GenerationResult, rows: list[list[int]],
                first_token_s: float | None) -> None:
    """The run's one batch (every prompt, in order; `prompt_ids` unpadded; `tokens` per prompt, each up
    to its stop id; a step lists the prompts that generated at it in `rows` when some had ended)."""
    payload = {
        "backend": opts.source.backend.value,
        "tp": opts.tp,
        "first_token_s": first_token_s,
        "batches": [{
            "prompts": list(range(len(rows))),
            "prompt_ids": rows,
            "tokens": result.tokens,
            "steps": [{"tokens": s.tokens.tolist(), **({"logits": s.logits.tolist()} if opts.logits else {}),
                       **({"rows": s.rows.tolist()} if len(s.rows) < len(rows) else {})}
                      for s in result.steps],
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s,
        }],
    }
    opts.json_out.parent.mkdir(parents=True, exist_ok=True)
    write_json(opts.json_out, payload)  # the logits are finite (`generate.check_finite`)
