"""Block-wise symmetric weight quantization: the numbers every exporter, backend and reference share.

A weight `w [rows, K]` (rows = output channels, K = the input features this rank holds) is cut into
blocks of `block_size` consecutive input features per output channel; each block has one scale

    scale = max|w_block| / qmax,   q = clamp(round(w / scale), -qmax, qmax),   w ≈ q * scale

with qmax = 2**(bits-1) - 1 (127 for int8, 7 for int4): the restricted symmetric range (zero point 0,
positive scales, -128 / -8 unused), as TensorRT's weight-only GEMMs and ONNX `DequantizeLinear`
(opset 21+, `block_size`) take it. Rounding is half-to-even (torch.round), which numpy's rint matches.
An all-zero block gets scale 1 (its q are 0). Scales are fp32 here and cast to the activation dtype by
the graph pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llama_export.config import WeightQuant
from llama_export.errors import ConfigError


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_blocks(name: str, k: int, block_size: int, *, hint: str = "", all_k: tuple[int, ...] = ()) -> None:
    """Raise ConfigError unless `block_size` divides the `k` input features of weight `name`; the
    message suggests the block sizes that divide `k` and every size in `all_k`."""
    if k % block_size:
        fits = [b for b in (16, 32, 64, 128, 256) if all(x % b == 0 for x in (k, *all_k))]
        raise ConfigError(
            f"block_size={block_size} does not divide the {k} input features of {name}{hint}, so a block "
            f"would straddle ranks or run off the end; choose --block-size from {fits or 'none of 16..256'}"
        )


def quantize_blocks(w: Tensor, *, bits: int, block_size: int,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """w [rows, K] -> (q int8 [rows, K] in [-qmax, qmax], scale [rows, K / block_size] in `scale_dtype`).

    The scale is rounded to `scale_dtype` before q is computed, so q is the best integer for the scale
    the graph will really multiply by. Rows are independent, so they are quantized a slice at a time
    (`_CHUNK_ELEMENTS`): the fp32 temporaries stay small whatever the tensor (an 8B output projection
    would otherwise need several 2 GiB copies at once)."""
    rows, k = w.shape
    assert k % block_size == 0, (k, block_size)  # callers check with `check_blocks` first
    q = torch.empty(rows, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows, k // block_size, dtype=scale_dtype, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r in range(0, rows, step):
        blocks = w[r:r + step].detach().to(torch.float32, copy=True).reshape(-1, k // block_size, block_size)
        s = (blocks.abs().amax(dim=-1) / qmax(bits)).to(scale_dtype).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        blocks.div_(s.unsqueeze(-1)).round_().clamp_(-qmax(bits), qmax(bits))
        q[r:r + step] = blocks.reshape(-1, k).to(torch.int8)
        scale[r:r + step] = s.to(scale_dtype)
    return q, scale


_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per slice


def dequantize_blocks(q: Tensor, scale: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize_blocks`: q [rows, K] int8, scale [rows, K/B] -> w [rows, K] in `dtype`.

    The product is taken in the scale's dtype, as `DequantizeLinear` does (y = q * scale in its type)."""
    rows, k = q.shape
    blocks = q.reshape(rows, scale.shape[1], -1).to(scale.dtype) * scale.unsqueeze(-1)
    return blocks.reshape(rows, k).to(dtype)


def fake_quantize(w: Tensor, scheme: WeightQuant, *, scale_dtype: torch.dtype) -> Tensor:
    """`w` [rows, K] quantized and dequantized again: the values a quantized graph computes with."""
    q, scale = quantize_blocks(w, bits=scheme.bits, block_size=scheme.block_size, scale_dtype=scale_dtype)
    return dequantize_blocks(q, scale, dtype=w.dtype)


def quantized_parameters(model: nn.Module, scheme: WeightQuant) -> list[str]:
    """The parameters of a rank's model (any device, meta included) that `scheme` quantizes; raises
    ConfigError when `scheme.block_size` does not divide one's input features on this rank."""
    shape = getattr(model, "shape", None)
    where = f" on rank {shape.rank} at tp={shape.tp}" if shape is not None and shape.tp > 1 else ""
    sizes = {name: p.shape[1] for name, p in model.named_parameters() if p.dim() == 2 and scheme.quantizes(name)}
    for name, k in sizes.items():
        check_blocks(name, k, scheme.block_size, hint=where, all_k=tuple(sizes.values()))
    return list(sizes)


def quantize_model_(model: nn.Module, scheme: WeightQuant) -> list[str]:
    """Replace, in place, the weights a quantized export quantizes by their dequantized values.

    This is the eager reference of a quantized export: same rank slices, same blocks, same scales (in
    the model's dtype), fp computation afterwards. Linear weights are `[out, in]` with blocks along
    `in`; the embedding `[vocab, local_dim]` has blocks along `local_dim`. Returns the parameter names."""
    names = quantized_parameters(model, scheme)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(fake_quantize(params[name], scheme, scale_dtype=params[name].dtype))
    return names
