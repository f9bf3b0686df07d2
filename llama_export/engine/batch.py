"""One batch through the engine: `generate(step, prompt, cache)`, the prompts of a padded batch as
requests in the slots of a cache the caller made, driven to the end on the caller's thread (tests,
benchmarks, `compare`'s reference); its result also by step (`steps`), as `run --json` writes it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_export.engine.engine import Engine, Ranks, Request
from llama_export.engine.generate import SamplingConfig, check_capacity
from llama_export.runner.step import StepFn


@dataclass
class StepRecord:
    """The i-th generated token of each row that has one (`rows`: all of them, unless some row ended
    earlier at a stop id)."""

    tokens: np.ndarray  # [R] chosen ids
    logits: np.ndarray  # [R, V] fp32 ([R, 0] when the logits were not kept)
    rows: np.ndarray  # [R] which rows of the batch


@dataclass
class GenerationResult:
    """A batch's completions: each row's ids (its stop id included, where it stopped), and the same by
    step (`steps`)."""

    prompt: np.ndarray  # [B, S] right-padded ids
    prompt_lengths: np.ndarray  # [B]
    tokens: list[list[int]]  # per row, ragged where rows stopped at different steps
    steps: list[StepRecord]
    prefill_s: float = 0.0  # prefill forwards and the first tokens' sampling
    decode_s: float = 0.0

    @property
    def new_tokens(self) -> np.ndarray:
        """[B, K] generated ids (every row the same length: no row stopped early)."""
        if len({len(t) for t in self.tokens}) > 1:
            raise ValueError("rows stopped at different steps; read `tokens` (ragged) instead")
        return np.array(self.tokens, dtype=np.int64).reshape(len(self.tokens), -1)


def steps_of(tokens: list[list[int]], logits: list[list[np.ndarray]] | None) -> list[StepRecord]:
    """Per-row ids (and logits per token, if kept) regrouped by step."""
    out = []
    for i in range(max((len(t) for t in tokens), default=0)):
        rows = np.array([r for r, t in enumerate(tokens) if len(t) > i], dtype=np.int64)
        lg = np.stack([logits[r][i] for r in rows]) if logits is not None else np.zeros((len(rows), 0), np.float32)
        out.append(StepRecord(tokens=np.array([tokens[r][i] for r in rows], dtype=np.int64), logits=lg, rows=rows))
    return out


def generate(
    step: StepFn,
    prompt: Any,
    cache: tuple[list, list],
    *,
    max_new_tokens: int,
    prompt_lengths: Any = None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Collection[int] = (),
    keep_logits: bool = True,
) -> GenerationResult:
    """Generate for a batch of prompts through the engine (`engine.Engine`, driven here): one request
    per row, every row in a slot of `cache`, all prompts prefilled in the first step (`prefill_groups`),
    then one token per row per step; a row ends at max_new_tokens or one of `stop_ids`. Each row samples
    from its own generator seeded with `sampling.seed`, so a row gives what its prompt gives alone.

    prompt: `[B, S]` ids (numpy, or anything `np.asarray` takes: a CPU tensor), right-padded when
    `prompt_lengths` says rows are shorter than S; cache: empty (`make_cache`) keys and values whose
    capacity holds every row's prompt + max_new_tokens (its rows end up in prompt-length order)."""
    prompt = np.ascontiguousarray(prompt, dtype=np.int64)
    bsz = prompt.shape[0]
    lengths = np.asarray(prompt_lengths, dtype=np.int64) if prompt_lengths is not None else \
        np.full(bsz, prompt.shape[1], dtype=np.int64)
    capacity = cache[0][0].shape[2]
    check_capacity(lengths, max_new_tokens, capacity)
    engine = Engine(Ranks([step], [lambda _slots, _capacity: cache], slots=bsz, capacity=capacity), vocab_size=None,
                    slots=bsz, capacity=capacity, prefill_tokens=int(lengths.sum()), background=False)
    done = engine.run_all([Request(tuple(int(t) for t in prompt[b, :lengths[b]]), max_tokens=max_new_tokens,
                                   sampling=sampling, stop_ids=frozenset(int(t) for t in stop_ids),
                                   logits=keep_logits) for b in range(bsz)])
    tokens = [c.tokens for c in done]
    return GenerationResult(prompt=prompt, prompt_lengths=lengths, tokens=tokens,
                            steps=steps_of(tokens, [c.logits for c in done] if keep_logits else None),
                            prefill_s=engine.prefill_s, decode_s=engine.decode_s)
