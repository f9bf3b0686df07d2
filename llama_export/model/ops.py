"""RMSNorm, RoPE and cached attention as torch custom ops, so that export emits one `llama_export` node
for each (`artifact/schema.py` is the contract; these eager implementations *are* its semantics).

- `rms_norm(x, weight, eps)`: ``y = (x / sqrt(mean(x², -1) + eps)).to(x.dtype) * weight``, normalised in
  fp32 whatever the I/O dtype (as Meta's and Hugging Face's RMSNorm do).
- `rope(x, cos, sin, start, interleaved)`: x is ``[batch, seq, heads, head_dim]``; cos/sin are the model's
  tables ``[max_seq_len, head_dim/2]`` (fp32); token ``(b, i)`` is at absolute position ``start[b] + i``.
  Pairs are ``(2i, 2i+1)`` when interleaved (Meta) and ``(i, i + head_dim/2)`` otherwise (rotate-half,
  Hugging Face). Each pair ``(a, b)`` becomes ``(a·cos - b·sin, a·sin + b·cos)``, in fp32, cast back.
- `attention(q, k, v, past_key, past_value, start, lengths)`: writes the valid new keys/values of every
  row into the preallocated cache at ``start[b] + i`` and attends causally over the cache (see
  `attention_in_place`).

The cache is written in place in eager runs. In export (`torch.compiler.is_exporting()`) the same
function calls the functional custom op instead, because a graph is functional: ``present = past`` with
the new slots written, which ONNX Runtime and TensorRT then run in place on one buffer (the op may not
return its input, and torch.export cannot translate a mutating custom op). Both paths run the same
`attention_in_place`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def positions(start: Tensor, seqlen: int) -> Tensor:
    """Absolute positions ``[B, S]`` of a step's tokens: ``start[b] + i``."""
    return start[:, None] + torch.arange(seqlen, device=start.device)[None, :]


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, interleaved: bool) -> Tensor:
    # x: [B, S, H, D]; cos/sin: [P, D/2] -> rows at positions [B, S, D/2] -> broadcast as [B, S, 1, D/2]
    xf = x.float()
    pos = positions(start, x.shape[1])
    c = cos.float()[pos][:, :, None, :]
    s = sin.float()[pos][:, :, None, :]
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        half = xf.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        out = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return out.to(x.dtype)


@dataclass(frozen=True)
class StepPlan:
    """What every layer's attention takes from a step's lengths, worked out once per forward: on CUDA
    each `int(tensor)` or boolean index is a host sync, which once per layer stalls the GPU n_layers
    times a step. Built from host lengths (`Transformer.step`) it costs no sync at all."""

    rows: Tensor  # [N] int64: the batch row of each valid new token
    cols: Tensor  # [N] int64: its index in the step
    slots: Tensor  # [N] int64: its cache slot, start[b] + i
    total: int  # cache slots any query can see: max(start + lengths)
    hidden: Tensor  # [B, 1, 1, S, total] bool: slot j is hidden from query (b, i) when j > start[b] + i


def plan_step(start: Tensor | np.ndarray, lengths: Tensor | np.ndarray, seqlen: int, device: torch.device
              ) -> StepPlan:
    """The `StepPlan` of a step of `seqlen` tokens; start/lengths `[B]` on the host (numpy or CPU
    tensors: no sync) or on `device` (one copy to the host)."""
    if isinstance(start, Tensor) and start.device.type != "cpu":
        start, lengths = torch.stack((start, lengths)).cpu()  # one copy, one sync
    start_h, lengths_h = np.asarray(start, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    rows, cols = np.nonzero(np.arange(seqlen)[None, :] < lengths_h[:, None])  # valid tokens, right-padded
    total = int((start_h + lengths_h).max()) if len(start_h) else 0
    pos = torch.as_tensor(start_h, device=device)[:, None] + torch.arange(seqlen, device=device)[None, :]  # [B, S]
    hidden = torch.arange(total, device=device)[None, None, :] > pos[:, :, None]  # [B, S, T]

    def dev(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64, device=device)

    return StepPlan(dev(rows), dev(cols), dev(start_h[rows] + cols), total, hidden[:, None, None])


def attention_in_place(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor, start: Tensor,
                       lengths: Tensor, plan: StepPlan | None = None) -> Tensor:
    """Write the new keys/values into the cache, then attend; returns ``y [B, S, H*D]``.

    q: ``[B, S, H, D]``; k/v: ``[B, S, KVH, D]`` (H a multiple of KVH: query head h reads KV head
    ``h // (H / KVH)``); cache_k/cache_v: ``[B, KVH, C, D]``, rows ``[0, start[b])`` already filled.
    Token ``(b, i)`` is valid for ``i < lengths[b]`` (right padding) and lands in slot ``start[b] + i``;
    query ``(b, i)`` attends keys ``j <= start[b] + i``, scores ``q·k / sqrt(D)`` with softmax in fp32.
    Outputs of padding rows and cache slots at or past ``start[b] + lengths[b]`` are unspecified.
    `plan`: `plan_step(start, lengths, S)`, made here when not given.
    """
    bsz, seqlen, n_heads, head_dim = q.shape
    if plan is None:
        plan = plan_step(start, lengths, seqlen, q.device)
    cache_k[plan.rows, :, plan.slots] = k[plan.rows, plan.cols]  # [N, KVH, D] into [B, KVH, C, D] at (b, :, slot)
    cache_v[plan.rows, :, plan.slots] = v[plan.rows, plan.cols]
    keys, values = cache_k[:, :, :plan.total], cache_v[:, :, :plan.total]  # [B, KVH, T, D] (views)
    n_kv = keys.shape[1]
    group = n_heads // n_kv
    # Grouped attention without repeating KV heads: the `group` query heads of KV head g are heads
    # [g*group, (g+1)*group), so [B, H, S, D] -> [B, KVH, group*S, D] shares one key matrix per KV head.
    qg = q.transpose(1, 2).reshape(bsz, n_kv, group * seqlen, head_dim)
    scores = torch.matmul(qg, keys.transpose(2, 3)).float() / math.sqrt(head_dim)  # [B, KVH, group*S, T]
    scores = scores.view(bsz, n_kv, group, seqlen, plan.total).masked_fill(plan.hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(bsz, n_kv, group * seqlen, plan.total)
    y = torch.matmul(probs, values)  # [B, KVH, group*S, D]
    return y.view(bsz, n_heads, seqlen, head_dim).transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)


@torch.library.custom_op("llama_export::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension (see module docstring)."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llama_export::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, interleaved: bool) -> Tensor:
    """Rotary position embedding of q or k (see module docstring)."""
    return rope_reference(x, cos, sin, start, interleaved)


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, interleaved: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llama_export::attention", mutates_args=())
def attention_functional(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, start: Tensor,
                         lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, present_key, present_value): `attention_in_place` on copies of the cache."""
    present_key, present_value = past_key.clone(), past_value.clone()
    y = attention_in_place(q, k, v, present_key, present_value, start, lengths)
    return y, present_key, present_value


@attention_functional.register_fake
def _(q, k, v, past_key, past_value, start, lengths):
    bsz, seqlen, n_heads, head_dim = q.shape
    return q.new_empty(bsz, seqlen, n_heads * head_dim), torch.empty_like(past_key), torch.empty_like(past_value)


def attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, start: Tensor,
              lengths: Tensor, *, plan: StepPlan | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, present_key, present_value); eager runs return the cache tensors themselves, written in place.
    `plan`: the forward's `plan_step` (eager only; export traces the custom op)."""
    if torch.compiler.is_exporting():
        return attention_functional(q, k, v, past_key, past_value, start, lengths)
    y = attention_in_place(q, k, v, past_key, past_value, start, lengths, plan)
    return y, past_key, past_value


# Autograd (used by the demo-model trainer): differentiate the reference implementation itself, so the
# gradient can never drift from the forward semantics.
def _setup_save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, Tensor)])
    ctx.scalars = [t for t in inputs if not isinstance(t, Tensor)]


def _vjp(fn, ctx, grad: Tensor):
    tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
    with torch.enable_grad():
        out = fn(*tensors, *ctx.scalars)
        wrt = [t for t in tensors if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in tensors) + (None,) * len(ctx.scalars)


rms_norm.register_autograd(lambda ctx, g: _vjp(rms_norm_reference, ctx, g), setup_context=_setup_save_inputs)
rope.register_autograd(lambda ctx, g: _vjp(rope_reference, ctx, g), setup_context=_setup_save_inputs)
