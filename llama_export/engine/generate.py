"""What generation is made of: sampling, prompt checks, prefill grouping, one step on cache rows. The
loop itself is the engine's (`engine.py`); `batch.py` runs one batch through it.

The step function is the rank's model (`runner.step`). Prompts of different lengths run as one batch: the
prefill takes rows of similar length together (`prefill_groups`: each call computes its longest row's
length for every row, so rows of 16 and 256 tokens are not padded to 512), then one token per row per
step for the whole batch. Every rank runs this same loop on identical (all-gathered) logits, so greedy and
seeded sampling pick the same token everywhere without extra communication.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_export.errors import InputError, NonFiniteError
from llama_export.runner.step import StepFn

log = logging.getLogger(__name__)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (sampling and perplexity)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def check_finite(logits: np.ndarray, where: Callable[[int], str]) -> None:
    """NonFiniteError unless every row of `logits` `[B, V]` is finite; `where(row)` says where the row was
    computed ("in the prefill of request 0"). One pass over the step's logits: cheap next to the step itself."""
    finite = np.isfinite(logits).all(axis=-1)
    if not finite.all():
        raise NonFiniteError(
            f"non-finite logits (NaN or Inf) {where(int(np.argmin(finite)))}: the checkpoint's weights hold NaN/Inf, "
            "or fp16 overflowed; check the weights, or run in fp32 (--dtype fp32, or an fp32 export)")


def pad_prompts(rows: list[list[int]] | tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids `[B, max length]` (padding id 0) and the lengths `[B]` of ragged prompts."""
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, np.array([len(r) for r in rows], dtype=np.int64)


def check_capacity(prompt_lengths: np.ndarray, max_new_tokens: int, capacity: int) -> None:
    """InputError unless every row's prompt + new tokens fits the KV cache capacity."""
    longest = int(np.max(prompt_lengths))
    if longest + max_new_tokens > capacity:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the KV cache capacity of {capacity} tokens per row; shorten the prompt, ask for fewer tokens or "
            "give a larger capacity (at most the model's max_seq_len)"
        )


# The fixed cost of one forward call (every weight read once, kernel set-up) in tokens of prefill
# compute. Measured on a 2-core CPU (ONNX Runtime, 134M model): ~20 with fp32 weights, ~5 with int4.
PREFILL_CALL_TOKENS = 16


def prefill_groups(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Ranges `[a, b)` of neighbouring rows with prompt (chunk) `lengths` to prefill one call each: the
    grouping with the fewest padded token slots computed (a call computes its longest row's length for
    every row), each call counting PREFILL_CALL_TOKENS more. Equal lengths stay one call; rows in
    ascending length (as the engine admits them together) group best."""
    n = len(lengths)
    cost, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best grouping of the first j rows: its last call is rows cut[j] .. j-1
        width = 0
        for i in range(j - 1, -1, -1):
            width = max(width, int(lengths[i]))
            c = cost[i] + (j - i) * width + PREFILL_CALL_TOKENS
            if c < cost[j]:
                cost[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


MAX_TEMPERATURE = 1000.0  # already uniform sampling for any real model; larger values are typos


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 keeps every token."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise InputError(f"temperature={self.temperature} must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.seed < 1 << 63:
            raise InputError(f"seed={self.seed} must be in [0, 2**63)")
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")


def validate_prompt(prompt: np.ndarray, *, vocab_size: int | None, max_seq_len: int, max_new_tokens: int,
                    limit_name: str | None = None) -> None:
    """Raise InputError for an empty prompt, unknown token ids (only negative ones where `vocab_size` is
    None: not known to the caller), or a prompt that outgrows the context (`max_seq_len` tokens per row,
    called `limit_name` in messages: default "max_seq_len=N")."""
    limit_name = limit_name or f"max_seq_len={max_seq_len}"
    prompt = np.asarray(prompt)
    if prompt.ndim != 2:
        raise InputError(f"prompt ids must be [batch, seq], got shape {tuple(prompt.shape)}")
    if prompt.shape[1] == 0:
        raise InputError("the prompt is empty; give at least one token")
    if prompt.shape[1] >= max_seq_len:
        raise InputError(
            f"the prompt ({prompt.shape[1]} tokens) does not fit the context {limit_name} with "
            "room for one new token; shorten it"
        )
    bad = prompt[(prompt < 0) | (prompt >= vocab_size)] if vocab_size is not None else prompt[prompt < 0]
    if bad.size:
        raise InputError(
            f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size if vocab_size is not None else 'V'}); "
            "check the tokenizer/model pair"
        )
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens} must be >= 0")
    total = prompt.shape[1] + max_new_tokens
    if total > max_seq_len:
        raise InputError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"context limit {limit_name} (the KV cache capacity per row); shorten the prompt or ask for fewer tokens"
        )


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token ids `[B]` from fp32 logits `[B, V]` (greedy, or temperature + nucleus sampling)."""
    if cfg.temperature == 0:
        return logits.argmax(axis=-1)
    probs = np.exp(log_softmax(logits.astype(np.float64) / cfg.temperature))
    idx = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, idx, axis=-1)
    keep = np.cumsum(sorted_p, axis=-1) - sorted_p < cfg.top_p  # always keeps the most likely token
    if cfg.top_k:
        keep[:, cfg.top_k:] = False
    sorted_p = sorted_p * keep
    choice = [rng.choice(len(p), p=p / p.sum()) for p in sorted_p]
    return idx[np.arange(len(idx)), choice]


def run_rows(step: StepFn, tokens: np.ndarray, cache_lengths: np.ndarray, token_lengths: np.ndarray,
             keys: list, values: list, rows: slice) -> Any:
    """One step on the cache rows `rows` (a slice of every layer's keys and values); returns the
    logits. The backends write that slice in place and return it; a step function that returns new
    arrays instead has them copied into the slice."""
    k_rows, v_rows = [k[rows] for k in keys], [v[rows] for v in values]
    logits, k_out, v_out = step(np.ascontiguousarray(tokens), cache_lengths, token_lengths, k_rows, v_rows)
    for given, got in zip(k_rows + v_rows, list(k_out) + list(v_out)):
        if got is not given:
            given[...] = got
    return logits
