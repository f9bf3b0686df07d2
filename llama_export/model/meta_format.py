"""Meta checkpoints: `params.json` + `consolidated.NN.pth`, read lazily and resharded; and the writer.

Meta's model-parallel layout (fairscale, as in `meta-llama/llama`): the source shards split
`tok_embeddings` along dim 1, wq/wk/wv/w1/w3/output along dim 0, wo/w2 along dim 1, and replicate the
norms. The global tensor is the concatenation of the shards; any target slice is cut from the pieces.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from llama_export import dtypes
from llama_export.config import ModelConfig, RopeScaling
from llama_export.errors import CheckpointError
from llama_export.model import tensor_mismatch
from llama_export.model.memory import COPY_BLOCK_BYTES, release_pages
from llama_export.parallel.plan import Slice

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
# Keys older Meta checkpoints carry that the model derives itself.
_IGNORED_KEYS = {"rope.freqs"}


def meta_split_dim(name: str) -> int | None:
    """Dimension along which Meta's model-parallel shards split parameter `name` (None: replicated)."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"), key=lambda p: int(_SHARD_RE.fullmatch(p.name).group(1)))
    if not files:
        raise CheckpointError(f"{path} has params.json but no consolidated.NN.pth files; copy the weights there")
    idx = [int(_SHARD_RE.fullmatch(p.name).group(1)) for p in files]
    if idx != list(range(len(files))):
        raise CheckpointError(
            f"{path}: shard files are numbered {idx}, expected 0..{len(files) - 1}; a shard is missing"
        )
    return files


class MetaReader:
    """Reads slices of global parameters out of memory-mapped source shards."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = Path(path)
        self.shapes = shapes
        self.files = shard_files(self.path)
        self.shards: list[dict[str, Tensor]] = []

    def __enter__(self) -> MetaReader:
        for f in self.files:
            try:
                self.shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/ValueError here
                first = str(e).splitlines()[0] if str(e) else ""
                first = first if len(first) <= 100 else first[:first.find(". ", 40) + 1 or 100]
                raise CheckpointError(
                    f"cannot read {f} ({type(e).__name__}: {first}); "
                    "the file is truncated or corrupt: download or copy it again"
                ) from None
        self._check_keys()
        return self

    def __exit__(self, *exc) -> None:
        self.shards.clear()

    def _check_keys(self) -> None:
        """Both ways: every tensor params.json implies is there, nothing else is (a params.json with
        fewer layers than the weights would otherwise run a truncated model), all of a float type."""
        n = len(self.shards)
        for i, shard in enumerate(self.shards):
            if not isinstance(shard, dict):
                raise CheckpointError(f"{self.files[i]} holds a {type(shard).__name__}, not a state dict of tensors; "
                                      "it is not a Meta checkpoint shard")
            keys = set(shard) - _IGNORED_KEYS
            missing = sorted(set(self.shapes) - keys)
            extra = sorted(map(str, keys - set(self.shapes)))
            if missing or extra:
                raise CheckpointError(f"{self.files[i]} does not match params.json: {tensor_mismatch(missing, extra)}; "
                                      "check that params.json belongs to these weights")
            for name in self.shapes:
                check_weight_dtype(name, shard[name], self.files[i])
        for name, want in self.shapes.items():
            dim = meta_split_dim(name)
            got = list(self.shards[0][name].shape)
            if dim is not None:
                got[dim] = sum(s[name].shape[dim] for s in self.shards)
            if tuple(got) != want:
                raise CheckpointError(
                    f"{name} has global shape {tuple(got)} across {n} shard(s) but params.json implies {want}; "
                    "check that params.json belongs to these weights"
                )

    def read(self, name: str, sl: Slice) -> Tensor:
        """Global parameter `name` restricted to `sl` (clipped at the tensor's end), copied out."""
        pieces = [s[name] for s in self.shards]
        src_dim = meta_split_dim(name)
        if src_dim is None or len(pieces) == 1:
            full = pieces[0]
            if sl.dim is None:
                return copy_and_release(full)
            return copy_and_release(full, sl.dim, sl.start, min(sl.stop, full.shape[sl.dim]))
        if sl.dim is None or sl.dim != src_dim:
            # Target splits another dim (or none): cut each piece, then concatenate along the source dim.
            cut = [copy_and_release(p) if sl.dim is None else copy_and_release(p, sl.dim, sl.start, sl.stop)
                   for p in pieces]
            return torch.cat(cut, dim=src_dim)
        out, offset = [], 0
        for p in pieces:
            size = p.shape[src_dim]
            lo, hi = max(sl.start, offset), min(sl.stop, offset + size)
            if lo < hi:
                out.append(copy_and_release(p, src_dim, lo - offset, hi - offset))
            offset += size
        return torch.cat(out, dim=src_dim)


def check_weight_dtype(name: str, t: object, file: Path) -> None:
    """Weights are tensors of a float type (`dtypes.FLOAT_TYPES`): casting anything else (integers,
    bool, fp8 without its scales) to the model dtype would give a silently wrong model."""
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{name} in {file} is a {type(t).__name__}, not a tensor; the file is not a checkpoint shard")
    if t.dtype not in {d.torch for d in dtypes.FLOAT_TYPES}:
        raise CheckpointError(
            f"{name} in {file} has dtype {str(t.dtype).removeprefix('torch.')}; weights must be one of "
            f"{', '.join(sorted(d.name for d in dtypes.FLOAT_TYPES))} (dequantize the checkpoint first)"
        )


def copy_and_release(t: Tensor, dim: int | None = None, start: int = 0, stop: int = 0) -> Tensor:
    """Copy `t` (or `t.narrow(dim, start, stop - start)`) out of a memory-mapped shard, block by block,
    telling the kernel after each block that the mapped file pages are no longer needed.

    Without the release, a column slice (dim 1) touches every page of the tensor and the whole file
    would end up resident in this process; with it, peak memory is this rank's share plus one block.
    """
    if dim is None:
        dim, start, stop = 0, 0, t.shape[0] if t.dim() else 1
        if t.dim() == 0:
            return t.clone()
    out = torch.empty(*t.shape[:dim], stop - start, *t.shape[dim + 1 :], dtype=t.dtype)
    rows = t.shape[0]
    row_bytes = max(1, t[0].numel() * t.element_size()) if rows else 1
    step = max(1, COPY_BLOCK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if dim == 0:
            lo, hi = max(r0, start), min(r1, stop)
            if lo < hi:
                out[lo - start : hi - start] = t[lo:hi]
        else:
            out[r0:r1] = t[r0:r1].narrow(dim, start, stop - start)
        release_pages(t[r0:r1])
    return out


def to_meta_params(cfg: ModelConfig, *, multiple_of: int, ffn_dim_multiplier: float | None = None) -> dict:
    """`params.json` content for `cfg` (`multiple_of`/`ffn_dim_multiplier` must reproduce hidden_dim)."""
    from llama_export.config import meta_ffn_hidden_dim

    if meta_ffn_hidden_dim(cfg.dim, multiple_of, ffn_dim_multiplier) != cfg.hidden_dim:
        raise CheckpointError(
            f"multiple_of={multiple_of}, ffn_dim_multiplier={ffn_dim_multiplier} do not give "
            f"hidden_dim={cfg.hidden_dim} for dim={cfg.dim}"
        )
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_seq_len": cfg.max_seq_len,
    }
    if cfg.rope_scaling is not None:
        params["use_scaled_rope"] = True
        if cfg.rope_scaling != RopeScaling():
            params["rope_scaling"] = vars(cfg.rope_scaling).copy()
    return params


def save_meta_checkpoint(
    path: Path, state: dict[str, Tensor], params: dict, *, n_shards: int = 1
) -> None:
    """Write a full (unsharded) state dict as Meta's `n_shards` model-parallel files + `params.json`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        shard = {}
        for name, t in state.items():
            dim = meta_split_dim(name)
            if dim is None:
                shard[name] = t.clone()
            else:
                if t.shape[dim] % n_shards:
                    raise CheckpointError(f"{name} dim {dim} of size {t.shape[dim]} does not split into {n_shards}")
                shard[name] = t.chunk(n_shards, dim=dim)[i].clone()
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(params, indent=2))
