"""Checkpoint loading: config, then exactly one rank's slices, then a ready `Transformer`.

Formats (detected from the files present):
- Meta: `params.json` + `consolidated.NN.pth` (any number of source shards, resharded to any valid tp).
- Hugging Face: `config.json` + `model.safetensors` or `model.safetensors.index.json` + shards.
- GGUF (llama.cpp): one `.gguf` file (or a folder holding exactly one), weights dequantized on read
  (`gguf_format`).

A rank reads only its own slices: `.pth` files are memory-mapped (`torch.load(mmap=True,
weights_only=True)`) and safetensors are sliced lazily, so peak memory tracks the rank's share. Packed
model parameters (`parallel.plan.PACKED`: wqkv, w13) are the rank's slices of their sources concatenated,
built one parameter at a time.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from llama_export.config import ModelConfig, WeightQuant, read_hf_config, read_meta_params
from llama_export.errors import CheckpointError
from llama_export.gguf_file import GGUFFile, checkpoint_gguf, is_gguf, open_gguf
from llama_export.model.memory import HeapTrimmer
from llama_export.model.quantize import quantize_model_
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import Communicator
from llama_export.parallel.plan import (
    RankShape,
    Slice,
    model_parameter_names,
    packed_sizes,
    packed_sources,
    shard_slice,
)

log = logging.getLogger(__name__)


class CheckpointFormat(str, enum.Enum):
    META = "meta"
    HF = "hf"
    GGUF = "gguf"


def detect_format(path: Path) -> CheckpointFormat:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --checkpoint DIR (or FILE.gguf)")
    if checkpoint_gguf(path) is not None:
        return CheckpointFormat.GGUF
    if (path / "params.json").is_file():
        return CheckpointFormat.META
    if (path / "config.json").is_file():
        return CheckpointFormat.HF
    raise CheckpointError(
        f"{path} holds neither params.json (Meta format), config.json (Hugging Face format) nor a .gguf file; "
        "point --checkpoint at the folder that contains them, or at the .gguf file"
    )


def load_config(path: Path, *, max_seq_len: int | None = None) -> ModelConfig:
    """The model config of a checkpoint folder or GGUF file, or of a lone `params.json` (Meta) /
    `config.json` (HF) file (`plan --config`); `max_seq_len` (export --max-seq-len) overrides the file's."""
    path = Path(path)
    if path.is_file() and not is_gguf(path):
        file, meta = path, _is_meta_params(path)
    else:
        fmt = detect_format(path)
        if fmt is CheckpointFormat.GGUF:
            return _gguf_config(open_gguf(checkpoint_gguf(path)), max_seq_len=max_seq_len)
        meta = fmt is CheckpointFormat.META
        file = path / ("params.json" if meta else "config.json")
    if meta:
        return ModelConfig.from_meta_params(read_meta_params(file), max_seq_len=max_seq_len, source=str(file))
    return ModelConfig.from_hf_config(read_hf_config(file), max_seq_len=max_seq_len, source=str(file))


def _gguf_config(g: GGUFFile, *, max_seq_len: int | None) -> ModelConfig:
    """A GGUF's config: its metadata, with what only the tensors say (tied output, RoPE scaling)."""
    from llama_export.model import gguf_format

    tokens = g.get("tokenizer.ggml.tokens")
    cfg = ModelConfig.from_gguf(g.metadata, n_tokens=len(tokens) if tokens is not None else None,
                                tied=gguf_format.is_tied(g), max_seq_len=max_seq_len, source=str(g.path))
    scaling = gguf_format.rope_scaling(g, head_dim=cfg.head_dim, theta=cfg.rope_theta)
    return cfg if scaling is None else dataclasses.replace(cfg, rope_scaling=scaling)


def _is_meta_params(file: Path) -> bool:
    """A lone config file: Meta's params.json or HF's config.json, by name, else by content (HF's
    LlamaConfig always has `hidden_size`, Meta's params never); the typed reader names any problem."""
    if file.name in ("params.json", "config.json"):
        return file.name == "params.json"
    try:
        return "hidden_size" not in json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, TypeError, OSError):
        return True


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global parameter shapes, by Meta name, implied by the config."""
    hd, d = cfg.head_dim, cfg.dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (cfg.n_heads * hd, d),
            p + "attention.wk.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wv.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, cfg.n_heads * hd),
            p + "feed_forward.w1.weight": (cfg.hidden_dim, d),
            p + "feed_forward.w2.weight": (d, cfg.hidden_dim),
            p + "feed_forward.w3.weight": (cfg.hidden_dim, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        }
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes


def pad_to(t: Tensor, sl: Slice) -> Tensor:
    """Zero-pad `t` along `sl.dim` to `sl.stop - sl.start` (vocabulary padding of the last rank)."""
    if sl.dim is None or t.shape[sl.dim] == sl.stop - sl.start:
        return t
    shape = list(t.shape)
    shape[sl.dim] = sl.stop - sl.start
    out = t.new_zeros(shape)
    out.narrow(sl.dim, 0, t.shape[sl.dim]).copy_(t)
    return out


class RankWeights:
    """Lazy access to one rank's parameter slices (`get(name)`), opened as a context manager.

    Only the requested slice of a tensor is read; nothing else of the checkpoint becomes resident.
    """

    def __init__(self, path: Path, shape: RankShape, *, dtype: torch.dtype) -> None:
        from llama_export.model import hf_format, meta_format

        self.path = Path(path)
        self.shape = shape
        self.dtype = dtype
        self.shapes = expected_shapes(shape.cfg)
        fmt = detect_format(self.path)
        if fmt is CheckpointFormat.GGUF:
            from llama_export.model import gguf_format

            self.reader = gguf_format.GGUFReader(open_gguf(checkpoint_gguf(self.path)), self.shapes)
        elif fmt is CheckpointFormat.META:
            self.reader = meta_format.MetaReader(self.path, self.shapes)
        else:
            self.reader = hf_format.HFReader(self.path, shape.cfg, self.shapes)

    def __enter__(self) -> RankWeights:
        self.reader.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.reader.__exit__(*exc)

    def names(self) -> list[str]:
        """The model's parameter names (packed projections under their packed names)."""
        return model_parameter_names(list(self.shapes))

    def get(self, name: str) -> Tensor:
        """This rank's slice of model parameter `name` (Meta spelling, or a packed name), cast to the
        dtype. A packed parameter is its sources' slices concatenated along dim 0."""
        sources = packed_sources(name)
        if sources is not None:
            return torch.cat([self._slice(src) for src in sources], dim=0)
        return self._slice(name)

    def _slice(self, name: str) -> Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"{name} is not a parameter of this model")
        sl = shard_slice(name, self.shape)
        return pad_to(self.reader.read(name, sl), sl).to(self.dtype).contiguous()


def load_rank_state(path: Path, shape: RankShape, *, dtype: torch.dtype) -> dict[str, Tensor]:
    """This rank's model parameters (packed projections packed), cast to `dtype`."""
    trimmer = HeapTrimmer()
    state = {}
    with RankWeights(path, shape, dtype=dtype) as w:
        for name in w.names():
            state[name] = t = w.get(name)
            trimmer.loaded(t.numel() * t.element_size())
    return state


def checkpoint_state(model: Transformer) -> dict[str, Tensor]:
    """A TP=1 model's parameters under checkpoint (Meta) names: packed projections split back into
    their sources (`parallel.plan.PACKED`), e.g. for `meta_format.save_meta_checkpoint`."""
    if model.shape.tp != 1:
        raise ValueError("checkpoint_state needs the whole model (tp=1)")
    state = {}
    for name, t in model.state_dict().items():
        sources = packed_sources(name)
        parts = t.split(list(packed_sizes(name, model.shape))) if sources else (t,)
        state.update(zip(sources or (name,), parts))
    return state


def build_model(
    path: Path,
    *,
    cfg: ModelConfig | None = None,
    tp: int = 1,
    rank: int = 0,
    comm: Communicator | None = None,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
    device: torch.device | str = "cpu",
    weights: WeightQuant | None = None,
) -> Transformer:
    """Config + rank `rank`'s weights from `path`, as a ready eval-mode `Transformer`.

    With `weights`, the weights that scheme quantizes hold their dequantized values (the eager
    reference of a quantized export, `model.quantize.quantize_model_`). `cfg`: the checkpoint's config
    where the caller has already loaded it (with any `max_seq_len` applied), else it is loaded here."""
    if cfg is None:
        cfg = load_config(path, max_seq_len=max_seq_len)
    elif max_seq_len is not None and max_seq_len != cfg.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} contradicts the config given (max_seq_len={cfg.max_seq_len})")
    with torch.device("meta"):
        model = Transformer(cfg, tp=tp, rank=rank, comm=comm)
    state = load_rank_state(path, model.shape, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if weights is not None:
        quantize_model_(model, weights)
    return model.to(device).eval()
