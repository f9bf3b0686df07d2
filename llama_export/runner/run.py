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
import torch.distributed as dist

from llama_export.config import Backend, ModelConfig, Precision
from llama_export.errors import InputError
from llama_export.parallel.comm import Communicator, DistComm, LocalComm
from llama_export.parallel.plan import check_tp
from llama_export.runner.generate import GenerationResult, SamplingConfig, generate_stream, validate_prompt
from llama_export.runner.launch import RankEnv, die_with_launcher, init_process_group, launch_local, rank_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    backend: Backend
    tp: int
    max_new_tokens: int
    checkpoint: Path | None = None
    artifacts: Path | None = None
    dtype: Precision = Precision.FP32
    prompt_ids: tuple[tuple[int, ...], ...] | None = None
    prompts: tuple[str, ...] | None = None
    sampling: SamplingConfig = SamplingConfig()
    json_out: Path | None = None
    device: str = "cpu"
    stream: bool = True


def parse_prompt_ids(text: str) -> tuple[tuple[int, ...], ...]:
    """'1,2,3' -> ((1, 2, 3),); rows of a batch are separated by ';' and must have equal lengths."""
    try:
        rows = tuple(tuple(int(t) for t in row.split(",") if t.strip()) for row in text.split(";"))
    except ValueError:
        raise InputError(f"--prompt-ids {text!r} must be comma-separated integers (rows separated by ';')") from None
    if len({len(r) for r in rows}) != 1:
        raise InputError(f"--prompt-ids rows have different lengths {[len(r) for r in rows]}; pad them to one length")
    return rows


def new_token_budget(opts: RunOptions, prompt_len: int, max_seq_len: int) -> int:
    """Tokens to generate. Text generation stops at the context limit (a prompt that alone fills the
    context is an error); `--prompt-ids` runs must fit exactly (`validate_prompt` refuses them)."""
    if opts.prompts is None or prompt_len >= max_seq_len:
        return opts.max_new_tokens
    return min(opts.max_new_tokens, max_seq_len - prompt_len)


def model_config_for(opts: RunOptions) -> ModelConfig:
    from llama_export.runner.steps import config_for

    return config_for(opts)


def run(opts: RunOptions, argv: list[str], reporter: Reporter | None = None) -> int:
    """Entry point of the `run` subcommand, in the parent process or in a rank process.

    `argv` is what rank processes are started with; `reporter` receives rank 0's output."""
    env = rank_env()
    if env is None:
        cfg = model_config_for(opts)
        check_tp(cfg, opts.tp)
        prompt = _prompt_tensor(opts)
        validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                        max_new_tokens=new_token_budget(opts, prompt.shape[1], cfg.max_seq_len))
        if opts.tp > 1:
            return launch_local(argv, opts.tp)
        env = RankEnv(rank=0, world_size=1, local_rank=0)
    die_with_launcher()
    if env.world_size != opts.tp:
        raise InputError(f"started with WORLD_SIZE={env.world_size} but --tp {opts.tp}; make them equal")
    device = torch.device(opts.device if opts.device != "cuda" else f"cuda:{env.local_rank}")
    comm: Communicator = LocalComm()
    if env.world_size > 1:
        init_process_group(env, device)
        comm = DistComm()
    try:
        code = _run_rank(opts, env, comm, device, reporter or _Silent())
        if dist.is_initialized():
            dist.barrier()  # nobody tears the group down while a peer still talks to it
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _prompt_tensor(opts: RunOptions) -> torch.Tensor:
    if opts.prompt_ids is not None:
        return torch.tensor(opts.prompt_ids, dtype=torch.int64)
    from llama_export.runner.steps import tokenizer_for

    tok = tokenizer_for(opts)
    rows = [tok.encode(p) for p in opts.prompts or ()]
    if not rows or any(len(r) == 0 for r in rows) or any(not p.strip() for p in opts.prompts or ()):
        raise InputError("the prompt is empty; give some text with --prompt")
    if len({len(r) for r in rows}) != 1:
        raise InputError(
            f"batch prompts tokenize to different lengths {[len(r) for r in rows]}; only equal-length "
            "prompts can share a batch (run them separately)"
        )
    return torch.tensor(rows, dtype=torch.int64)


@dataclass(frozen=True)
class RunSummary:
    """What rank 0 reports when generation ends."""

    prompts: tuple[str, ...] | None  # text prompts, or None for --prompt-ids runs
    texts: tuple[str, ...]  # generated text per prompt ("" for --prompt-ids runs)
    prompt_tokens: int
    batch: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    streamed: bool  # the text of prompt 0 was already passed to `Reporter.text`
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
    from llama_export.runner.steps import build_step, tokenizer_for

    prompt = _prompt_tensor(opts).to(device)
    step, empty_cache, cfg, eos_id = build_step(opts, comm=comm, device=device, batch=prompt.shape[0])
    budget = new_token_budget(opts, prompt.shape[1], cfg.max_seq_len)
    validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_new_tokens=budget)
    tok = tokenizer_for(opts) if opts.prompts is not None else None
    stream = env.rank == 0 and tok is not None and opts.stream and prompt.shape[0] == 1
    if stream:
        reporter.text(opts.prompts[0])
    # One throw-away step first, so that the reported prefill time is not the first call's set-up
    # (kernel selection, allocator warm-up, lazy initialisation). The cache is functional: nothing stays.
    with torch.inference_mode():
        step(prompt[:, :1], *empty_cache)
    result = GenerationResult(prompt=prompt)
    shown = ""
    for _, result in generate_stream(
        step, prompt, empty_cache, max_new_tokens=budget, sampling=opts.sampling,
        eos_id=eos_id if tok is not None else None, keep_logits=opts.json_out is not None,
    ):
        if stream:
            text = tok.decode(result.new_tokens[0].tolist())
            reporter.text(text[len(shown):])
            shown = text
    if env.rank == 0:
        if opts.json_out is not None:
            _write_json(opts, result)
        n_new, batch = len(result.steps), prompt.shape[0]
        reporter.finish(opts, RunSummary(
            prompts=opts.prompts,
            texts=tuple(tok.decode(ids) for ids in result.new_tokens.tolist()) if tok else ("",) * batch,
            prompt_tokens=prompt.shape[1], batch=batch, new_tokens=n_new,
            prefill_tok_s=prompt.numel() / result.prefill_s if result.prefill_s else 0.0,
            decode_tok_s=batch * (n_new - 1) / result.decode_s if result.decode_s else 0.0,
            streamed=stream,
            context_limit=cfg.max_seq_len if budget < opts.max_new_tokens and n_new == budget else None,
        ))
    return 0


def _write_json(opts: RunOptions, result: GenerationResult) -> None:
    payload = {
        "backend": opts.backend.value,
        "tp": opts.tp,
        "prompt_ids": result.prompt.tolist(),
        "tokens": result.new_tokens.tolist(),
        "steps": [{"tokens": s.tokens.tolist(), "logits": s.logits.tolist()} for s in result.steps],
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
    }
    opts.json_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.json_out.with_suffix(opts.json_out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(opts.json_out)
