"""Generation loop shared by every backend: prefill, then one token at a time with the KV cache.

A *step function* maps `(tokens [B, S], past_keys, past_values)` to `(logits [B, vocab] fp32,
present_keys, present_values)`. The eager model is one; a stitched sequence of exported segments is
another (`runner.stitch`). Every rank runs this same loop on identical (all-gathered) logits, so greedy
and seeded sampling pick the same token everywhere without extra communication.
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

StepFn = Callable[[Tensor, list[Tensor], list[Tensor]], tuple[Tensor, list[Tensor], list[Tensor]]]


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


def validate_prompt(prompt: Tensor, *, vocab_size: int, max_seq_len: int, max_new_tokens: int) -> None:
    """Raise InputError for an empty prompt, unknown token ids, or a prompt that outgrows the context."""
    if prompt.dim() != 2:
        raise InputError(f"prompt ids must be [batch, seq], got shape {tuple(prompt.shape)}")
    if prompt.shape[1] == 0:
        raise InputError("the prompt is empty; give at least one token")
    if prompt.shape[1] >= max_seq_len:
        raise InputError(
            f"the prompt ({prompt.shape[1]} tokens) does not fit the context max_seq_len={max_seq_len} with "
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
            f"context limit max_seq_len={max_seq_len}; shorten the prompt or ask for fewer tokens"
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
    prompt: Tensor
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
    empty_cache: tuple[list[Tensor], list[Tensor]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Collection[int] = (),
    keep_logits: bool = True,
) -> Iterator[tuple[StepRecord, GenerationResult]]:
    """Yield each chosen token as soon as it exists; stops when every row has produced one of
    `stop_ids` (a row that stopped keeps running until then) or after max_new_tokens."""
    gen = torch.Generator().manual_seed(sampling.seed)
    result = GenerationResult(prompt=prompt)
    keys, values = empty_cache
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.int64, device=prompt.device)
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, keys, values = step(tokens, keys, values)
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
        tokens = nxt.unsqueeze(1)


def generate(
    step: StepFn,
    prompt: Tensor,
    empty_cache: tuple[list[Tensor], list[Tensor]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Collection[int] = (),
) -> GenerationResult:
    """`generate_stream` run to the end."""
    result = GenerationResult(prompt=prompt)
    for _, result in generate_stream(step, prompt, empty_cache, max_new_tokens=max_new_tokens,  # noqa: B007
                                     sampling=sampling, stop_ids=stop_ids):
        pass
    return result
