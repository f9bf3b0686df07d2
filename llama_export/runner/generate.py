"""Generation loop shared by every backend: prefill, then one token at a time with the KV cache.

A *step function* maps `(tokens [B, S], cache_lengths [B], token_lengths [B], keys, values)` to
`(logits [B, vocab] fp32, keys, values)` (`artifact/schema.py`: right-padded rows, a preallocated cache
written in place at per-row positions; a backend may return the same cache tensors). The eager model is
one; a stitched sequence of exported segments is another (`runner.stitch`). Prompts of different lengths
run as one batch: right-padded for the prefill, then one token per row per step. Every rank runs this
same loop on identical (all-gathered) logits, so greedy and seeded sampling pick the same token
everywhere without extra communication.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llama_export.errors import InputError

log = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]], tuple[Tensor, list[Tensor], list[Tensor]]]
# make_cache(batch, capacity) -> (keys, values): zeroed, shaped and typed as the step function wants
MakeCache = Callable[[int, int], tuple[list[Tensor], list[Tensor]]]


def pad_prompts(rows: list[list[int]] | tuple[tuple[int, ...], ...]) -> tuple[Tensor, Tensor]:
    """Right-padded ids `[B, max length]` (padding id 0) and the lengths `[B]` of ragged prompts."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def check_capacity(prompt_lengths: Tensor, max_new_tokens: int, capacity: int) -> None:
    """InputError unless every row's prompt + new tokens fits the KV cache capacity."""
    longest = int(prompt_lengths.max())
    if longest + max_new_tokens > capacity:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the KV cache capacity of {capacity} tokens per row; shorten the prompt, ask for fewer tokens or "
            "give a larger capacity (at most the model's max_seq_len)"
        )


MAX_TEMPERATURE = 1000.0  # already uniform sampling for any real model; larger values are typos


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise InputError(f"temperature={self.temperature} must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.seed < 1 << 63:
            raise InputError(f"seed={self.seed} must be in [0, 2**63)")


def validate_prompt(prompt: Tensor, *, vocab_size: int, max_seq_len: int, max_new_tokens: int,
                    limit_name: str | None = None) -> None:
    """Raise InputError for an empty prompt, unknown token ids, or a prompt that outgrows the context
    (`max_seq_len` tokens per row, called `limit_name` in messages: default "max_seq_len=N")."""
    limit_name = limit_name or f"max_seq_len={max_seq_len}"
    if prompt.dim() != 2:
        raise InputError(f"prompt ids must be [batch, seq], got shape {tuple(prompt.shape)}")
    if prompt.shape[1] == 0:
        raise InputError("the prompt is empty; give at least one token")
    if prompt.shape[1] >= max_seq_len:
        raise InputError(
            f"the prompt ({prompt.shape[1]} tokens) does not fit the context {limit_name} with "
            "room for one new token; shorten it"
        )
    bad = prompt[(prompt < 0) | (prompt >= vocab_size)]
    if bad.numel():
        raise InputError(
            f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size}); check the tokenizer/model pair"
        )
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
    total = prompt.shape[1] + max_new_tokens
    if total > max_seq_len:
        raise InputError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"context limit {limit_name} (the KV cache capacity per row); shorten the prompt or ask for fewer tokens"
        )


def sample(logits: Tensor, cfg: SamplingConfig, gen: torch.Generator) -> Tensor:
    """Next token ids `[B]` from fp32 logits `[B, V]` (greedy, or temperature + nucleus sampling)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=gen).to(idx.device)
    return idx.gather(-1, choice).squeeze(-1)


@dataclass
class StepRecord:
    tokens: Tensor  # [B] chosen ids
    logits: Tensor  # [B, V] fp32


@dataclass
class GenerationResult:
    prompt: Tensor  # [B, S] right-padded ids
    prompt_lengths: Tensor  # [B]
    steps: list[StepRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def new_tokens(self) -> Tensor:
        """[B, K] generated ids."""
        if not self.steps:
            return self.prompt.new_zeros(self.prompt.shape[0], 0)
        return torch.stack([s.tokens for s in self.steps], dim=1)


def generate_stream(
    step: StepFn,
    prompt: Tensor,
    cache: tuple[list[Tensor], list[Tensor]],
    *,
    max_new_tokens: int,
    prompt_lengths: Tensor | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Collection[int] = (),
    keep_logits: bool = True,
) -> Iterator[tuple[StepRecord, GenerationResult]]:
    """Yield each chosen token as soon as it exists; stops when every row has produced one of
    `stop_ids` (a row that stopped keeps running until then) or after max_new_tokens.

    prompt: `[B, S]` ids, right-padded when `prompt_lengths` says rows are shorter than S; cache: empty
    (`make_cache`) keys and values whose capacity holds every row's prompt + max_new_tokens."""
    gen = torch.Generator().manual_seed(sampling.seed)
    bsz = prompt.shape[0]
    lengths = prompt_lengths.to(prompt.device) if prompt_lengths is not None else \
        torch.full((bsz,), prompt.shape[1], dtype=torch.int64, device=prompt.device)
    result = GenerationResult(prompt=prompt, prompt_lengths=lengths)
    keys, values = cache
    check_capacity(lengths, max_new_tokens, keys[0].shape[2])
    cached = torch.zeros_like(lengths)
    tokens = prompt
    finished = torch.zeros(bsz, dtype=torch.bool, device=prompt.device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.int64, device=prompt.device)
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, keys, values = step(tokens, cached, lengths, keys, values)
        nxt = sample(logits, sampling, gen)
        dt = time.perf_counter() - t0
        if i == 0:
            result.prefill_s += dt
        else:
            result.decode_s += dt
        rec = StepRecord(tokens=nxt, logits=logits if keep_logits else logits[:, :0])
        result.steps.append(rec)
        yield rec, result
        if stops.numel():
            finished |= torch.isin(nxt, stops)
            if bool(finished.all()):
                break
        cached = cached + lengths
        lengths = torch.ones_like(lengths)
        tokens = nxt.unsqueeze(1)


def generate(
    step: StepFn,
    prompt: Tensor,
    cache: tuple[list[Tensor], list[Tensor]],
    *,
    max_new_tokens: int,
    prompt_lengths: Tensor | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Collection[int] = (),
) -> GenerationResult:
    """`generate_stream` run to the end."""
    result = None
    for _, result in generate_stream(step, prompt, cache, max_new_tokens=max_new_tokens,  # noqa: B007
                                     prompt_lengths=prompt_lengths, sampling=sampling, stop_ids=stop_ids):
        pass
    return result or GenerationResult(prompt=prompt, prompt_lengths=torch.full(
        (prompt.shape[0],), prompt.shape[1], dtype=torch.int64))
