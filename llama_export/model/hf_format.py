"""Hugging Face checkpoints: `config.json` + safetensors (single file or sharded with an index).

Names map to Meta's, and q/k rows are permuted from HF's rotate-half layout to Meta's interleaved one.
HF's conversion script turns Meta's per-head row order (i, half) into (half, i):
    w_hf = w_meta.view(heads, hd/2, 2, dim).transpose(1, 2).reshape(heads*hd, dim)
so the inverse, applied per head to any head-aligned row slice, is
    w_meta = w_hf.view(heads, 2, hd/2, dim).transpose(1, 2).reshape(heads*hd, dim)
"""

from __future__ import annotations

import json
import os
import re
import struct
from contextlib import ExitStack
from pathlib import Path

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, StringConstraints
from safetensors import SafetensorError, safe_open
from torch import Tensor

from llama_export import dtypes
from llama_export.config import ModelConfig
from llama_export.errors import CheckpointError
from llama_export.model import tensor_mismatch
from llama_export.model.memory import COPY_BLOCK_BYTES
from llama_export.parsing import parse_json_file
from llama_export.parallel.plan import Slice

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# Buffers some exporters save that the model derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(meta_name: str) -> str:
    if meta_name in _TOP_MAP:
        return _TOP_MAP[meta_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_name)
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


def rotate_half_to_interleaved(w: Tensor, head_dim: int) -> Tensor:
    """Permute head-aligned q/k rows from HF rotate-half order to Meta interleaved order."""
    rows, cols = w.shape
    return w.reshape(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_rotate_half(w: Tensor, head_dim: int) -> Tensor:
    """Inverse of `rotate_half_to_interleaved` (Meta -> HF, as HF's conversion script does)."""
    rows, cols = w.shape
    return w.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class SafetensorsIndex(BaseModel):
    """`model.safetensors.index.json`: tensor name -> shard file (a plain file name next to it)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    weight_map: dict[str, Annotated[str, StringConstraints(pattern=r"^[^/\\]+\.safetensors$")]]


class HFReader:
    """Lazy slices of HF safetensors, returned under Meta names in Meta layout."""

    def __init__(self, path: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.shapes = shapes
        self._stack = ExitStack()
        self.files: dict[str, str] = {}  # hf name -> file name
        self.handles: dict[str, object] = {}
        self.raw: dict[str, RawSafetensors] = {}

    def __enter__(self) -> HFReader:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            self.files = dict(parse_json_file(index, SafetensorsIndex, error=CheckpointError,
                                              fix="copy the index again from the original checkpoint").weight_map)
        elif single.is_file():
            self.files = {}
        else:
            found = sorted(p.name for p in self.path.glob("*.bin"))
            hint = " (PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if found else ""
            raise CheckpointError(f"{self.path} has config.json but no model.safetensors or its index{hint}")
        names = set(self.files.values()) or {"model.safetensors"}
        for fname in sorted(names):
            f = self.path / fname
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in the safetensors index but missing; copy it there")
            try:
                self.handles[fname] = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {f} ({e}); the file is truncated or corrupt: copy it again") from None
        if not self.files:
            h = self.handles["model.safetensors"]
            self.files = {k: "model.safetensors" for k in h.keys()}
        self._check()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _source(self, meta_name: str) -> str:
        name = hf_name(meta_name)
        if name not in self.files and meta_name == "output.weight" and self.cfg.tie_word_embeddings:
            return hf_name("tok_embeddings.weight")
        return name

    def _check(self) -> None:
        """Both ways: every tensor config.json implies is there with its shape and a float dtype, and
        nothing else is (a config.json naming fewer layers than the weights hold would otherwise run a
        truncated model)."""
        expected = {self._source(n) for n in self.shapes}
        missing = sorted(hf_name(n) for n in self.shapes if self._source(n) not in self.files)
        extra = sorted(n for n in self.files if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
        if missing or extra:
            raise CheckpointError(
                f"{self.path}: the safetensors files do not match config.json: {tensor_mismatch(missing, extra)}; "
                "check that config.json belongs to these weights"
            )
        for meta_name, want in self.shapes.items():
            src = self._source(meta_name)
            info = self.handles[self.files[src]].get_slice(src)
            got = tuple(info.get_shape())
            if got != want:
                raise CheckpointError(
                    f"{src} has shape {got} but config.json implies {want}; "
                    "check that config.json belongs to these weights"
                )
            code = info.get_dtype()
            if dtypes.by_safetensors(code) not in dtypes.FLOAT_TYPES:
                raise CheckpointError(
                    f"{src} in {self.path / self.files[src]} has dtype {code}; weights must be one of "
                    f"{', '.join(d.safetensors for d in dtypes.FLOAT_TYPES)} (dequantize the checkpoint first)"
                )

    def read(self, meta_name: str, sl: Slice) -> Tensor:
        src = self._source(meta_name)
        fname = self.files[src]
        if fname not in self.raw:
            self.raw[fname] = RawSafetensors(self.path / fname)
        t = self.raw[fname].read(src, sl)
        if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = rotate_half_to_interleaved(t, self.cfg.head_dim)
        return t


class RawSafetensors:
    """Slices of one safetensors file read with `pread`, never through a memory map.

    `safe_open` has already validated the file; this only parses the documented header (8-byte
    little-endian length + JSON with dtype, shape and data_offsets) to find where each tensor lives,
    so that a column slice is read row block by row block without mapping (and so without making
    resident) the whole tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n

    def read(self, name: str, sl: Slice) -> Tensor:
        info = self.header[name]
        spelled = dtypes.by_safetensors(info["dtype"])
        if spelled is None or not spelled.is_float:
            raise CheckpointError(f"{name} in {self.path} has dtype {info['dtype']}; expected F32, F16 or BF16")
        dtype = spelled.torch
        shape = list(info["shape"])
        begin = self.base + info["data_offsets"][0]
        esize = torch.empty((), dtype=dtype).element_size()
        row = (int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1) * esize
        with open(self.path, "rb") as f:
            fd = f.fileno()
            if sl.dim is None or sl.dim == 0:
                lo, hi = (0, shape[0]) if sl.dim is None else (sl.start, min(sl.stop, shape[0]))
                out = torch.empty([hi - lo, *shape[1:]], dtype=dtype)
                _pread_into(fd, out, begin + lo * row)
                return out
            out = torch.empty([shape[0], min(sl.stop, shape[1]) - sl.start, *shape[2:]], dtype=dtype)
            step = max(1, COPY_BLOCK_BYTES // row)
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                block = torch.empty([r1 - r0, *shape[1:]], dtype=dtype)
                _pread_into(fd, block, begin + r0 * row)
                out[r0:r1] = block[:, sl.start : sl.start + out.shape[1]]
            return out


def _pread_into(fd: int, t: Tensor, offset: int) -> None:
    buf = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file at byte {offset + done}; the file is truncated")
        done += n
