"""Block-wise weight quantization: the numbers every exporter, backend and reference share.

A weight `w [rows, K]` (rows = output channels, K = the input features this rank holds) is cut into
blocks of `block_size` consecutive input features per output channel; each block has one scale, and in
the asymmetric scheme one integer zero point:

    symmetric:   q = clamp(round(w / scale), -qmax, qmax),            w ≈ q * scale
    asymmetric:  q = clamp(round(w / scale) + zero, 0, 2**bits - 1),  w ≈ (q - zero) * scale

with qmax = 2**(bits-1) - 1 (127 for int8, 7 for int4): the symmetric scheme uses the restricted range
(-128 / -8 unused), as TensorRT's weight-only GEMMs take it (they accept no zero point but 0); the
asymmetric one stores unsigned q and a zero point in [0, 2**bits - 1] (uint4 / uint8), as ONNX
`DequantizeLinear` (opset 21+, `block_size`, y = (x - zero_point) * scale) and ONNX Runtime's
MatMulNBits / GatherBlockQuantized take them. Rounding is half-to-even (torch.round, numpy's rint).

The scale comes from the block's range: max|w| / qmax (symmetric) or (max(w, 0) - min(w, 0)) /
(2**bits - 1) with zero = round(-min(w, 0) / scale) (asymmetric; the range holds 0, so the integer zero
point is in range and every element is within scale / 2 of its grid point). With `search`, the range is
also tried shrunk by each ratio of `CLIP_RATIOS` (clipping the block's outliers to spend the levels on
the bulk of its values), each candidate's scale is refit by least squares to the q it rounds to, and
each block keeps the candidate with the smallest squared error weighted by |w| + the block's RMS (the
weights of llama.cpp's `make_qkx2_quants`: an error on a large weight costs more): never worse, by that
measure, than the plain range, which is one of the candidates. An all-zero
block gets scale 1 (its q are the zero point). Scales are rounded to the graph's scale dtype before q is
computed, so q is the best integer for the scale the graph really multiplies by.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from llama_export.config import WeightQuant
from llama_export.errors import ConfigError

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)  # `search`: range shrink factors tried


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


class Blocks(NamedTuple):
    """A quantized weight: q [rows, K] (int8 in [-qmax, qmax], or uint8 in [0, 2**bits - 1] when
    asymmetric), scale [rows, K / block_size], zero [rows, K / block_size] uint8 (None: symmetric)."""

    q: Tensor
    scale: Tensor
    zero: Tensor | None


def quantize_blocks(w: Tensor, *, bits: int, block_size: int, symmetric: bool = True, search: bool = False,
                    scale_dtype: torch.dtype = torch.float32) -> Blocks:
    """w [rows, K] -> `Blocks` in the scheme the module docstring writes out; scale in `scale_dtype`.

    Rows are independent, so they are quantized a slice at a time (`_CHUNK_ELEMENTS`): the fp32
    temporaries stay small whatever the tensor (an 8B output projection would otherwise need several
    2 GiB copies at once)."""
    rows, k = w.shape
    assert k % block_size == 0, (k, block_size)  # callers check with `check_blocks` first
    q = torch.empty(rows, k, dtype=torch.int8 if symmetric else torch.uint8, device=w.device)
    scale = torch.empty(rows, k // block_size, dtype=scale_dtype, device=w.device)
    zero = None if symmetric else torch.empty(rows, k // block_size, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // (k * (4 if search else 1)))
    for r in range(0, rows, step):
        blocks = w[r:r + step].detach().to(torch.float32).reshape(-1, k // block_size, block_size)
        qb, s, z = _fit(blocks, bits=bits, symmetric=symmetric, search=search, scale_dtype=scale_dtype)
        q[r:r + step] = qb.reshape(-1, k).to(q.dtype)
        scale[r:r + step] = s.to(scale_dtype)
        if zero is not None:
            zero[r:r + step] = z.to(torch.uint8)
    return Blocks(q, scale, zero)


_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per slice


def _fit(blocks: Tensor, *, bits: int, symmetric: bool, search: bool,
         scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """blocks [..., B] fp32 -> (q, scale, zero) as fp32 tensors holding integers (zero 0 if symmetric)."""
    lo_q, hi_q = (-qmax(bits), qmax(bits)) if symmetric else (0, 2 ** bits - 1)
    if symmetric:
        span, base = blocks.abs().amax(dim=-1) / qmax(bits), None
    else:
        lo, hi = blocks.amin(dim=-1).clamp(max=0), blocks.amax(dim=-1).clamp(min=0)
        span, base = (hi - lo) / hi_q, lo

    def rounded(s: Tensor) -> Tensor:
        s = s.to(scale_dtype).float()
        return torch.where(s > 0, s, torch.ones_like(s))

    def zero_for(s: Tensor) -> Tensor:
        return torch.zeros_like(s) if base is None else (-base / s).round().clamp(lo_q, hi_q)

    def levels(s: Tensor, z: Tensor) -> Tensor:  # q - z, the signed level of each element
        return (blocks / s.unsqueeze(-1)).round_().add_(z.unsqueeze(-1)).clamp_(lo_q, hi_q).sub_(z.unsqueeze(-1))

    # `search` weighs each element's squared error by its magnitude plus the block's RMS (llama.cpp's
    # make_qkx2 weights, `av_x + |x|`): clipping a large weight costs more than rounding a small one
    imp = blocks.abs().add_(blocks.square().mean(dim=-1, keepdim=True).sqrt_()) if search else None

    def error(d: Tensor, s: Tensor) -> Tensor:
        return d.mul_(s.unsqueeze(-1)).sub_(blocks).square_().mul_(imp).sum(dim=-1)

    s = rounded(span)
    z = zero_for(s)
    if search:
        err = error(levels(s, z), s)
        for ratio in CLIP_RATIOS:
            s_r = rounded(span * ratio)
            z_r = zero_for(s_r)
            d = levels(s_r, z_r)
            # weighted least-squares scale for these levels: argmin_s sum(imp (s d - w)^2) = <w, imp d> / <d, imp d>
            den = (d.square() * imp).sum(dim=-1)
            s_fit = rounded(torch.where(den > 0, (blocks * d * imp).sum(dim=-1) / den.clamp(min=1e-30), s_r).abs())
            err_fit = error(levels(s_fit, z_r), s_fit)
            better = err_fit < err
            s, z, err = torch.where(better, s_fit, s), torch.where(better, z_r, z), torch.where(better, err_fit, err)
    return levels(s, z).add_(z.unsqueeze(-1)), s, z


def dequantize_blocks(q: Tensor, scale: Tensor, zero: Tensor | None = None, *,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize_blocks`: q [rows, K], scale and zero [rows, K/B] -> w [rows, K] in `dtype`.

    The product is taken in the scale's dtype, as `DequantizeLinear` does (y = (q - zero) * scale in its
    type; q - zero is a small integer, exact in any float type)."""
    rows, k = q.shape
    ints = q.reshape(rows, scale.shape[1], -1).to(torch.int16)
    if zero is not None:
        ints = ints - zero.to(torch.int16).unsqueeze(-1)
    return (ints.to(scale.dtype) * scale.unsqueeze(-1)).reshape(rows, k).to(dtype)


def fake_quantize(w: Tensor, scheme: WeightQuant, *, scale_dtype: torch.dtype, param: str = "") -> Tensor:
    """`w` [rows, K] quantized and dequantized again: the values a quantized graph computes with;
    `param`: the parameter's name (the output projection may have its own bits, `WeightQuant.at`)."""
    blocks = quantize_blocks(w, **scheme.at(param).quantizer, scale_dtype=scale_dtype)
    return dequantize_blocks(*blocks, dtype=w.dtype)


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
            params[name].copy_(fake_quantize(params[name], scheme, scale_dtype=params[name].dtype, param=name))
    return names
