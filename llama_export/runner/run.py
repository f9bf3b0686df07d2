"""`llama-export run`: generation across N rank processes on any backend.

The parent process checks everything it can cheaply (config, TP degree, prompt), then either runs
rank 0 itself (tp=1) or starts the rank processes (`launch.launch_local`). Each rank builds its step
function for the chosen backend and runs the same generation loop; rank 0 reports.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from llama_export.errors import InputError
from llama_export.files import check_output_file, write_atomic
from llama_export.parallel.comm import Communicator
from llama_export.parallel.plan import check_tp
from llama_export.runner.generate import GenerationResult, SamplingConfig, generate_stream, validate_prompt
from llama_export.runner.launch import RankEnv, on_ranks, rank_env
from llama_export.runner.source import ModelSource
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
    device: str = "cpu"
    stream: bool = True
    threads: int | None = None  # CPU threads per rank (None: this machine's cores / tp, `rank_threads`)

    @property
    def is_text(self) -> bool:
        """Text in (prompts or chat) and out, through the model's tokenizer; else `prompt_ids`."""
        return self.prompts is not None or self.chat is not None


def parse_prompt_ids(text: str) -> tuple[tuple[int, ...], ...]:
    """'1,2,3' -> ((1, 2, 3),); rows of a batch are separated by ';' and must have equal lengths."""
    try:
        rows = tuple(tuple(int(t) for t in row.split(",") if t.strip()) for row in text.split(";"))
    except ValueError:
        raise InputError(f"--prompt-ids {text!r} must be comma-separated integers (rows separated by ';')") from None
    if bad := [t for row in rows for t in row if not 0 <= t < 1 << 31]:
        raise InputError(f"--prompt-ids: {bad[0]} is not a token id (ids are >= 0 and below the vocabulary size)")
    if len({len(r) for r in rows}) != 1:
        raise InputError(f"--prompt-ids rows have different lengths {[len(r) for r in rows]}; pad them to one length")
    return rows


def new_token_budget(opts: RunOptions, prompt_len: int, max_seq_len: int) -> int:
    """Tokens to generate. Text generation stops at the context limit (a prompt that alone fills the
    context is an error); `--prompt-ids` runs must fit exactly (`validate_prompt` refuses them)."""
    if not opts.is_text or prompt_len >= max_seq_len:
        return opts.max_new_tokens
    return min(opts.max_new_tokens, max_seq_len - prompt_len)


def run(opts: RunOptions, argv: list[str], reporter: Reporter | None = None) -> int:
    """Entry point of the `run` subcommand, in the parent process or in a rank process.

    `argv` is what rank processes are started with; `reporter` receives rank 0's output."""
    if rank_env() is None:
        opts.source.check_tp(opts.tp)
        cfg = opts.source.config()
        check_tp(cfg, opts.tp)
        for _, prompt in _prompt_groups(opts, opts.source.tokenizer() if opts.is_text else None):
            validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                            max_new_tokens=new_token_budget(opts, prompt.shape[1], cfg.max_seq_len))
        if opts.json_out is not None:
            check_output_file(opts.json_out, what="--json")
    return on_ranks(opts.tp, opts.device, argv,
                    lambda env, comm, device: _run_rank(opts, env, comm, device, reporter or _Silent()),
                    threads=opts.threads)


def _prompt_groups(opts: RunOptions, tok: Tokenizer | None) -> list[tuple[list[int], torch.Tensor]]:
    """Batches to run: (indices into the prompts, ids [B, S]). `--prompt-ids` rows form one batch, a chat
    is one row (the model's chat template applied); text prompts are grouped by token length (no
    padding), in order of first appearance."""
    if opts.prompt_ids is not None:
        return [(list(range(len(opts.prompt_ids))), torch.tensor(opts.prompt_ids, dtype=torch.int64))]
    if opts.chat is not None:
        if not opts.chat.strip():
            raise InputError("the chat message is empty; give some text with --chat")
        return [([0], torch.tensor([tok.chat(single_turn(opts.chat, system=opts.system))], dtype=torch.int64))]
    rows = [tok.encode(p) for p in opts.prompts or ()]
    if not rows or any(len(r) == 0 for r in rows) or any(not p.strip() for p in opts.prompts or ()):
        raise InputError("the prompt is empty; give some text with --prompt")
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    return [(idx, torch.tensor([rows[i] for i in idx], dtype=torch.int64)) for idx in groups.values()]


@dataclass(frozen=True)
class RunSummary:
    """What rank 0 reports when generation ends."""

    prompts: tuple[str, ...] | None  # text prompts (a chat: its user message), or None for --prompt-ids runs
    texts: tuple[str, ...]  # generated text per prompt, up to its stop token ("" for --prompt-ids runs)
    prompt_tokens: int  # all prompts together
    batches: int  # prompts run as this many batches (grouped by token length)
    new_tokens: int  # decode steps + 1, summed over batches
    prefill_tok_s: float
    decode_tok_s: float
    streamed: bool  # the text of prompt 0 was already passed to `Reporter.text`
    echo_prompt: bool  # the output shows the prompt before the generated text (not for a chat)
    context_limit: int | None  # max_seq_len, when generation stopped there


class Reporter(Protocol):
    """Where rank 0's output goes (the CLI prints it; the library never does)."""

    def text(self, delta: str) -> None: ...

    def finish(self, opts: RunOptions, summary: RunSummary) -> None: ...


class _Silent:
    def text(self, delta: str) -> None:
        pass

    def finish(self, opts: RunOptions, summary: RunSummary) -> None:
        pass


def _run_rank(opts: RunOptions, env: RankEnv, comm: Communicator, device: torch.device,
              reporter: Reporter) -> int:
    tok = opts.source.tokenizer() if opts.is_text else None
    groups = _prompt_groups(opts, tok)
    step, make_cache, cfg = opts.source.step(comm=comm, device=device)
    n_prompts = sum(len(idx) for idx, _ in groups)
    echo = opts.prompts is not None
    stream = TextStream(tok.decode) if env.rank == 0 and tok is not None and opts.stream and n_prompts == 1 else None
    if stream is not None and echo:
        reporter.text(opts.prompts[0])
    # One throw-away step first, so that the reported prefill time is not the first call's set-up
    # (kernel selection, allocator warm-up, lazy initialisation). The cache is functional: nothing stays.
    with torch.inference_mode():
        step(groups[0][1][:1, :1].to(device), *make_cache(1))
    texts = [""] * n_prompts
    results: list[tuple[list[int], GenerationResult]] = []
    prompt_tokens = new_tokens = decode_tokens = 0
    prefill_s = decode_s = 0.0
    hit_limit = False
    for idx, prompt in groups:
        prompt = prompt.to(device)
        budget = new_token_budget(opts, prompt.shape[1], cfg.max_seq_len)
        validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_new_tokens=budget)
        result = GenerationResult(prompt=prompt)
        stopped = False
        for rec, result in generate_stream(
            step, prompt, make_cache(prompt.shape[0]), max_new_tokens=budget, sampling=opts.sampling,
            stop_ids=tok.stop_ids if tok is not None else (), keep_logits=opts.json_out is not None,
        ):
            if stream is not None and not stopped:
                token = int(rec.tokens[0])
                stopped = token in tok.stop_ids
                if not stopped and (delta := stream.push([token])):
                    reporter.text(delta)
        if stream is not None and (rest := stream.finish()):
            reporter.text(rest)
        if tok is not None:
            for i, ids in zip(idx, result.new_tokens.tolist()):
                texts[i] = tok.decode(tok.until_stop(ids))
        n_new = len(result.steps)
        prompt_tokens += prompt.numel()
        new_tokens += n_new
        decode_tokens += prompt.shape[0] * max(0, n_new - 1)
        prefill_s += result.prefill_s
        decode_s += result.decode_s
        hit_limit |= budget < opts.max_new_tokens and n_new == budget
        results.append((idx, result))
    if env.rank == 0 and opts.json_out is not None:
        _write_json(opts, results)
    if env.rank == 0:
        reporter.finish(opts, RunSummary(
            prompts=opts.prompts if opts.chat is None else (opts.chat,), texts=tuple(texts), prompt_tokens=prompt_tokens, batches=len(groups),
            new_tokens=new_tokens, prefill_tok_s=prompt_tokens / prefill_s if prefill_s else 0.0,
            decode_tok_s=decode_tokens / decode_s if decode_s else 0.0, streamed=stream is not None,
            echo_prompt=echo,
            context_limit=cfg.max_seq_len if hit_limit else None,
        ))
    return 0


def _write_json(opts: RunOptions, results: list[tuple[list[int], GenerationResult]]) -> None:
    """Every batch of the run: `prompts` are the indices of its rows among the prompts given (text
    prompts of different token lengths run as separate batches)."""
    payload = {
        "backend": opts.source.backend.value,
        "tp": opts.tp,
        "batches": [{
            "prompts": idx,
            "prompt_ids": result.prompt.tolist(),
            "tokens": result.new_tokens.tolist(),
            "steps": [{"tokens": s.tokens.tolist(), "logits": s.logits.tolist()} for s in result.steps],
            "prefill_s": result.prefill_s,
            "decode_s": result.decode_s,
        } for idx, result in results],
    }
    opts.json_out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(opts.json_out, json.dumps(payload))
