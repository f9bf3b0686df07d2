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


def attention_in_place(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor, start: Tensor,
                       lengths: Tensor) -> Tensor:
    """Write the new keys/values into the cache, then attend; returns ``y [B, S, H*D]``.

    q: ``[B, S, H, D]``; k/v: ``[B, S, KVH, D]`` (H a multiple of KVH: query head h reads KV head
    ``h // (H / KVH)``); cache_k/cache_v: ``[B, KVH, C, D]``, rows ``[0, start[b])`` already filled.
    Token ``(b, i)`` is valid for ``i < lengths[b]`` (right padding) and lands in slot ``start[b] + i``;
    query ``(b, i)`` attends keys ``j <= start[b] + i``, scores ``q·k / sqrt(D)`` with softmax in fp32.
    Outputs of padding rows and cache slots at or past ``start[b] + lengths[b]`` are unspecified.
    """
    bsz, seqlen, n_heads, head_dim = q.shape
    pos = positions(start, seqlen)  # [B, S]
    valid = torch.arange(seqlen, device=q.device)[None, :] < lengths[:, None]
    rows = torch.arange(bsz, device=q.device)[:, None].expand(bsz, seqlen)[valid]
    slots = pos[valid]
    cache_k[rows, :, slots] = k[valid]  # [N, KVH, D] into [B, KVH, C, D] at (b, :, slot)
    cache_v[rows, :, slots] = v[valid]
    total = int((start + lengths).max())  # slots any query can see
    keys, values = cache_k[:, :, :total], cache_v[:, :, :total]  # [B, KVH, T, D] (views)
    n_rep = n_heads // keys.shape[1]
    if n_rep > 1:
        keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)).float() / math.sqrt(head_dim)  # [B, H, S, T]
    hidden = torch.arange(total, device=q.device)[None, None, :] > pos[:, :, None]  # [B, S, T]
    scores = scores.masked_fill(hidden[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)


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
              lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, present_key, present_value); eager runs return the cache tensors themselves, written in place."""
    if torch.compiler.is_exporting():
        return attention_functional(q, k, v, past_key, past_value, start, lengths)
    y = attention_in_place(q, k, v, past_key, past_value, start, lengths)
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
