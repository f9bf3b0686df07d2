"""GGUF checkpoints (llama.cpp): tensors under Meta names, dequantized one rank's slice at a time.

Names: llama.cpp's (`gguf.constants.TENSOR_NAMES` for `MODEL_ARCH.LLAMA`) map one to one onto Meta's. A
file without `output.weight` ties the output projection to `token_embd.weight`, as llama.cpp does.

Layout: llama.cpp's converter permutes HF's q/k rows with `LlamaModel.permute`,
    w.reshape(heads, 2, hd/2, dim).swapaxes(1, 2)
which is exactly the inverse of HF's own Meta -> HF permutation (`hf_format.rotate_half_to_interleaved`):
a GGUF stores q/k rows in Meta's interleaved order (ggml's "normal" RoPE rotates adjacent pairs), the
order this model uses, so nothing is permuted here (tests/model/test_gguf.py proves it against
transformers, which does undo the permutation to get HF's layout back).

Types: the float types are viewed as they are; the block-quantized ones (`QUANTIZED`) are dequantized
by gguf-py (`gguf.quants.dequantize`) to fp32. A block runs along a row (the input dimension), so a row
slice is whole blocks of whole rows, and a column slice reads only the blocks it overlaps, row block by
row block, releasing the mapped pages behind it (`memory.release_array`): a rank never holds more than
its share plus one block of rows. `raw` gives a tensor's bytes as stored, for a later step that carries
quantized blocks into an export as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llama_export.config import RopeScaling
from llama_export.errors import CheckpointError
from llama_export.gguf_file import GGUFFile
from llama_export.model import tensor_mismatch
from llama_export.model.memory import COPY_BLOCK_BYTES, release_array
from llama_export.parallel.plan import Slice

_LAYER_MAP = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 per-frequency RoPE factors: read into the config, not a weight

# Float types, viewed in place (BF16 is stored as raw 16-bit words).
FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Block types dequantized with gguf-py: the ones llama.cpp's llama-quantize makes for LLaMA users
# (the legacy 32-blocks and the K-quants of 256).
QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED = (*FLOAT, *QUANTIZED)


def gguf_name(meta_name: str) -> str:
    if meta_name in _TOP_MAP:
        return _TOP_MAP[meta_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_name)
    return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


def is_tied(g: GGUFFile) -> bool:
    """No output.weight: llama.cpp uses the token embedding as the output projection."""
    return not any(t.name == "output.weight" for t in g.reader.tensors)


def rope_scaling(g: GGUFFile, *, head_dim: int, theta: float) -> RopeScaling | None:
    """The Llama-3.1 scaling `rope_freqs.weight` encodes, or None without one.

    llama.cpp's converter stores the factors it computed from HF's `rope_scaling` (factor, low/high freq
    factors, original context; convert_hf_to_gguf `LlamaModel.generate_extra_tensors`) but not the four
    numbers. The largest factor is `factor`; the others are tried at the values every Llama 3.x release
    uses, with the original context from `llama.rope.scaling.original_context_length` where the file has
    it, and kept only if they reproduce the tensor."""
    t = next((t for t in g.reader.tensors if t.name == ROPE_FREQS), None)
    if t is None:
        return None
    from llama_export.model.layers import apply_rope_scaling

    if t.tensor_type.name != "F32" or tuple(t.shape) != (head_dim // 2,):
        raise CheckpointError(f"{g.path}: {ROPE_FREQS} is {t.tensor_type.name} of shape {tuple(int(n) for n in t.shape)}, "
                              f"expected F32 of shape ({head_dim // 2},); convert the model again")
    factors = torch.from_numpy(np.array(t.data, dtype=np.float32))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    original = g.get("llama.rope.scaling.original_context_length", RopeScaling().original_max_position_embeddings)
    guess = RopeScaling(factor=float(factors.max()), original_max_position_embeddings=int(original))
    want = (freqs / apply_rope_scaling(freqs, guess)).float()
    if torch.allclose(factors, want, rtol=1e-5, atol=0):
        return guess
    raise CheckpointError(
        f"{g.path}: {ROPE_FREQS} holds RoPE factors that are not Llama-3.1 scaling with factor={guess.factor}, "
        f"low_freq_factor={guess.low_freq_factor}, high_freq_factor={guess.high_freq_factor}, original context "
        f"{guess.original_max_position_embeddings} (largest difference {(factors - want).abs().max():.3g}); "
        "this RoPE scaling is not supported: convert the Hugging Face checkpoint instead")


@dataclass(frozen=True)
class RawTensor:
    """A tensor as the GGUF stores it: `data` is a read-only view of the mapped file (rows x bytes per row
    for a block type), `shape` the logical (rows, cols), `type` the ggml type name."""

    type: str
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFReader:
    """Slices of a GGUF's tensors, under Meta names, in Meta layout, as float tensors."""

    def __init__(self, g: GGUFFile, shapes: dict[str, tuple[int, ...]]) -> None:
        self.g = g
        self.path = Path(g.path)
        self.shapes = shapes
        self.tensors = {t.name: t for t in g.reader.tensors}

    def __enter__(self) -> GGUFReader:
        self._check()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _source(self, meta_name: str) -> str:
        name = gguf_name(meta_name)
        if name not in self.tensors and meta_name == "output.weight":
            return gguf_name("tok_embeddings.weight")
        return name

    def _check(self) -> None:
        """Both ways: every tensor the metadata implies is there with its shape and a supported type, and
        nothing else is."""
        expected = {self._source(n) for n in self.shapes} | {ROPE_FREQS}
        missing = sorted(self._source(n) for n in self.shapes if self._source(n) not in self.tensors)
        extra = sorted(n for n in self.tensors if n not in expected)
        if missing or extra:
            raise CheckpointError(f"{self.path}: the tensors do not match the llama.* metadata: "
                                  f"{tensor_mismatch(missing, extra)}; the GGUF is incomplete or not a plain LLaMA: "
                                  "convert the model again with llama.cpp's convert_hf_to_gguf.py")
        for meta_name, want in self.shapes.items():
            t = self.tensors[self._source(meta_name)]
            got = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
            if got != want:
                raise CheckpointError(f"{self.path}: {t.name} has shape {got} but the llama.* metadata implies {want}; "
                                      "the GGUF's metadata does not describe its tensors: convert the model again")
            kind = t.tensor_type.name
            if kind not in SUPPORTED:
                raise CheckpointError(f"{self.path}: {t.name} is of type {kind}, which this tool does not dequantize "
                                      f"(supported: {', '.join(SUPPORTED)}); requantize the model with llama-quantize to "
                                      "one of them, e.g. Q8_0 or Q4_K_M")

    def raw(self, meta_name: str) -> RawTensor:
        t = self.tensors[self._source(meta_name)]
        return RawTensor(t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), t.data)

    def read(self, meta_name: str, sl: Slice) -> Tensor:
        """Global tensor `meta_name` restricted to `sl` (clipped at the tensor's end), copied out of the file."""
        raw = self.raw(meta_name)
        if len(raw.shape) == 1:
            return _decode(raw.data, raw.type, (0, raw.shape[0]))
        rows, cols = raw.shape
        lo, hi = (sl.start, min(sl.stop, rows)) if sl.dim == 0 else (0, rows)
        span = (sl.start, min(sl.stop, cols)) if sl.dim == 1 else (0, cols)
        parts = []
        row_bytes = raw.data.shape[1] * raw.data.itemsize
        step = max(1, COPY_BLOCK_BYTES // max(1, row_bytes))
        for r0 in range(lo, hi, step):
            block = raw.data[r0:min(hi, r0 + step)]
            parts.append(_decode(block, raw.type, span))
            release_array(block)
        if not parts:  # a slice wholly past the end (vocabulary padding): `RankWeights` pads it
            return torch.zeros((0, span[1] - span[0]), dtype=FLOAT.get(raw.type, torch.float32))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _decode(data: np.ndarray, kind: str, cols: tuple[int, int]) -> Tensor:
    """Columns [cols) of the rows in `data` (as stored), as a float tensor: a float type in its own dtype,
    a block type dequantized to fp32 from only the blocks the columns overlap."""
    start, stop = cols
    if kind in FLOAT:
        words = data.view(np.int16) if kind == "BF16" else data  # BF16 comes as bytes
        t = torch.from_numpy(np.array(words[..., start:stop]))  # a copy out of the mapped file
        return t.view(torch.bfloat16) if kind == "BF16" else t
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b0, b1 = start // block, -(-stop // block)
    values = gguf.quants.dequantize(data[..., b0 * size : b1 * size], qtype)
    return torch.from_numpy(np.ascontiguousarray(values[..., start - b0 * block : stop - b0 * block]))
