"""RMSNorm and RoPE as torch custom ops, so that export emits one `llama_export` node for each.

The eager implementation *is* the reference semantics of the custom nodes (DESIGN.md, "Custom nodes"):

- `rms_norm(x, weight, eps)`: ``y = (x / sqrt(mean(x², -1) + eps)).to(x.dtype) * weight``, normalised in
  fp32 whatever the I/O dtype (as Meta's and Hugging Face's RMSNorm do).
- `rope(x, cos, sin, interleaved)`: x is ``[batch, seq, heads, head_dim]``; cos/sin are ``[seq, head_dim/2]``
  (fp32, one row per absolute position). Pairs are ``(2i, 2i+1)`` when interleaved (Meta) and
  ``(i, i + head_dim/2)`` otherwise (rotate-half, Hugging Face). Each pair ``(a, b)`` becomes
  ``(a·cos - b·sin, a·sin + b·cos)``, computed in fp32 and cast back to x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    # x: [B, S, H, D]; cos/sin: [S, D/2] -> broadcast as [1, S, 1, D/2]
    xf = x.float()
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        half = xf.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        out = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return out.to(x.dtype)


@torch.library.custom_op("llama_export::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension (see module docstring)."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llama_export::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotary position embedding of q or k (see module docstring)."""
    return rope_reference(x, cos, sin, interleaved)


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    return torch.empty_like(x)


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
