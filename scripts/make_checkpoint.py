"""Write a synthetic checkpoint with the exact shapes and file layout of a published LLaMA checkpoint.

Random (seeded) weights, no download. Tensors are generated and written one at a time, so the writer
never holds more than the largest tensor (the 1 GiB embedding at 8B), whatever the model size:

- Hugging Face (`--format hf`): `config.json` as published, bf16 safetensors split the way
  `save_pretrained` splits them (tensors in state-dict order, a new shard when the next tensor would
  pass 5 GB: Llama-3.1-8B gives the published 4 shards with the published weight map), and
  `model.safetensors.index.json`, or one `model.safetensors` below 5 GB. q/k rows are permuted into
  HF's rotate-half order exactly as HF's conversion script does, so the HF and Meta checkpoints of one
  preset and seed hold the same model.
- Meta (`--format meta`): `params.json` + `consolidated.NN.pth` (bf16, model-parallel shards split like
  Meta's). The `.pth` is written by `torch.save` with its storage bytes skipped
  (`torch.serialization.skip_data`), then filled tensor by tensor through a shared memory map.

    python scripts/make_checkpoint.py --preset llama-3.1-8b --format hf --out ckpts/llama-3.1-8b-hf
    python scripts/make_checkpoint.py --preset llama-3.2-1b --format meta --out ckpts/llama-3.2-1b
    python scripts/make_checkpoint.py --preset llama-3.1-405b --config-only --out cfgs/405b   # for `plan`
    python scripts/make_checkpoint.py --config my/config.json --format hf --out ckpts/tiny       # any config

Safetensors files are written with the format's documented layout (8-byte header length, JSON header,
data) because the `safetensors` writer needs every tensor of a shard in memory at once; a test checks
that the bytes equal `safetensors.torch.save_file`'s for the same tensors.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama_export.config import ModelConfig  # noqa: E402
from llama_export.errors import LlamaExportError  # noqa: E402
from llama_export.files import check_output_dir, staged_dir  # noqa: E402
from llama_export.model.checkpoint import expected_shapes  # noqa: E402
from llama_export.model.hf_format import hf_name, interleaved_to_rotate_half  # noqa: E402
from llama_export.model.memory import release_pages  # noqa: E402
from llama_export.model.meta_format import meta_split_dim  # noqa: E402

HF_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size="5GB"
DTYPE = torch.bfloat16

_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _hf_config(*, dim: int, layers: int, heads: int, ffn: int, tied: bool, rope_factor: float,
               transformers_version: str, head_dim: int | None = None) -> dict:
    """config.json as Meta published it on the Hugging Face Hub (Llama 3.1 / 3.2 base models)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001,
        **({"head_dim": head_dim} if head_dim else {}),
        "hidden_act": "silu", "hidden_size": dim, "initializer_range": 0.02, "intermediate_size": ffn,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {**_LLAMA3_ROPE, "factor": rope_factor},
        "rope_theta": 500000.0, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "transformers_version": transformers_version, "use_cache": True, "vocab_size": 128256,
    }
    return dict(sorted(cfg.items()))


def _meta_params(*, dim: int, layers: int, heads: int, multiplier: float, multiple_of: int,
                 rope_factor: float | None = None) -> dict:
    """params.json as Meta published it (3.2 adds `rope_scaling_factor`; see PRESETS)."""
    params = {"dim": dim, "ffn_dim_multiplier": multiplier, "multiple_of": multiple_of, "n_heads": heads,
              "n_kv_heads": 8, "n_layers": layers, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vocab_size": 128256}
    if rope_factor is not None:
        params["rope_scaling_factor"] = rope_factor
    return params


# name -> (HF config.json, Meta params.json, Meta model-parallel shards). Sizes from the published
# configs: 3.1-8B/70B/405B untied with RoPE factor 8; 3.2-1B/3B tied with factor 32. Meta's 3.2
# params.json leaves the factor to the reference code; it is written out here so that both formats of
# one preset describe the same model.
PRESETS: dict[str, tuple[dict, dict, int]] = {
    "llama-3.1-8b": (
        _hf_config(dim=4096, layers=32, heads=32, ffn=14336, tied=False, rope_factor=8.0,
                   transformers_version="4.43.0.dev0"),
        _meta_params(dim=4096, layers=32, heads=32, multiplier=1.3, multiple_of=1024), 1),
    "llama-3.1-70b": (
        _hf_config(dim=8192, layers=80, heads=64, ffn=28672, tied=False, rope_factor=8.0,
                   transformers_version="4.43.0.dev0"),
        _meta_params(dim=8192, layers=80, heads=64, multiplier=1.3, multiple_of=4096), 8),
    "llama-3.1-405b": (
        _hf_config(dim=16384, layers=126, heads=128, ffn=53248, tied=False, rope_factor=8.0,
                   transformers_version="4.43.0.dev0"),
        _meta_params(dim=16384, layers=126, heads=128, multiplier=1.2, multiple_of=4096), 8),
    "llama-3.2-1b": (
        _hf_config(dim=2048, layers=16, heads=32, ffn=8192, tied=True, rope_factor=32.0, head_dim=64,
                   transformers_version="4.45.0.dev0"),
        _meta_params(dim=2048, layers=16, heads=32, multiplier=1.5, multiple_of=256, rope_factor=32.0), 1),
    "llama-3.2-3b": (
        _hf_config(dim=3072, layers=28, heads=24, ffn=8192, tied=True, rope_factor=32.0, head_dim=128,
                   transformers_version="4.45.0.dev0"),
        _meta_params(dim=3072, layers=28, heads=24, multiplier=1.0, multiple_of=256, rope_factor=32.0), 1),
}


# ---- weights ------------------------------------------------------------------------------------
def random_tensor(name: str, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """Weights of Meta parameter `name`: N(0, 1/fan_in) for matrices, 1 + N(0, 0.1^2) for norms, bf16.

    Seeded by (seed, name) alone, so a tensor does not depend on which shard or format it lands in.
    Drawn in fp32 blocks of 16M elements, so no fp32 copy of a large tensor is ever held.
    """
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    out = torch.empty(shape, dtype=DTYPE)
    flat = out.view(-1)
    norm = name.endswith("norm.weight")
    std = 0.1 if norm else shape[1] ** -0.5
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        block = torch.randn(min(step, flat.numel() - i), generator=g) * std
        flat[i : i + block.numel()] = block + 1.0 if norm else block
    return out


def _source(name: str, *, tied: bool) -> str:
    """Tied models draw `output.weight` from the embedding's seed (the two are one tensor)."""
    return "tok_embeddings.weight" if name == "output.weight" and tied else name


# ---- Hugging Face -------------------------------------------------------------------------------
def hf_tensors(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, Meta name, shape) in `LlamaForCausalLM.state_dict()` order (what save_pretrained shards)."""
    shapes = expected_shapes(cfg)
    order = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        order += [p + s for s in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                                  "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                                  "feed_forward.w2.weight", "attention_norm.weight", "ffn_norm.weight")]
    order.append("norm.weight")
    if not cfg.tie_word_embeddings:
        order.append("output.weight")
    return [(hf_name(n), n, shapes[n]) for n in order]


def hf_shards(cfg: ModelConfig, *, shard_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Tensors grouped the way transformers' `save_pretrained` splits them at `shard_bytes`."""
    shards: list[list] = [[]]
    size = 0
    esize = torch.empty((), dtype=DTYPE).element_size()
    for entry in hf_tensors(cfg):
        n = esize * _numel(entry[2])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and the data order, as the safetensors serializer lays
    them out for tensors of one dtype: sorted by name, offsets contiguous, JSON padded with spaces to 8."""
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    order = sorted(name for name, _ in entries)
    shapes = dict(entries)
    for name in order:
        n = esize * _numel(shapes[name])
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_hf(out: Path, hf_config: dict, *, seed: int, shard_bytes: int = HF_SHARD_BYTES,
             progress: bool = True) -> None:
    cfg = ModelConfig.from_hf_config(hf_config)
    shards = hf_shards(cfg, shard_bytes=shard_bytes)
    total = sum(2 * _numel(s) for shard in shards for _, _, s in shard)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress)
    for fname, shard in zip(names, shards):
        meta_of = {hf: (meta, shape) for hf, meta, shape in shard}
        head, order = safetensors_header([(hf, shape) for hf, _, shape in shard], DTYPE)
        with open(out / fname, "wb") as f:
            f.write(head)
            for hf in order:
                meta, shape = meta_of[hf]
                t = random_tensor(_source(meta, tied=cfg.tie_word_embeddings), shape, seed=seed)
                if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
                    t = interleaved_to_rotate_half(t, cfg.head_dim).contiguous()
                f.write(memoryview(t.view(torch.int16).numpy()).cast("B"))
                bar.update(t.numel() * 2)
                weight_map[hf] = fname
        del t
    bar.close()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- Meta -----------------------------------------------------------------------------------------
def write_meta(out: Path, params: dict, *, seed: int, tied: bool, n_shards: int = 1, progress: bool = True) -> None:
    """`tied`: `output.weight` is a copy of the embedding (Meta stores both, as for Llama 3.2)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = ModelConfig.from_meta_params(params)
    shapes = expected_shapes(cfg)

    def piece(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dim = meta_split_dim(name)
        if dim is None:
            return shape
        if shape[dim] % n_shards:
            raise SystemExit(f"{name} dim {dim} of size {shape[dim]} does not split into {n_shards} shards")
        return tuple(s // n_shards if d == dim else s for d, s in enumerate(shape))

    files = [out / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    with FakeTensorMode():
        layout = {n: torch.empty(piece(n, s), dtype=DTYPE) for n, s in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        for f in files:
            torch.save(layout, f)  # storage regions reserved, not written
    for f in files:
        # The reserved regions are holes: allocate them now, so that a full disk is an OSError here and
        # not a SIGBUS when the memory map below first writes a page.
        with open(f, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    del layout
    old = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        mapped = [torch.load(f, mmap=True, weights_only=True) for f in files]
    finally:
        torch.serialization.set_default_mmap_options(old)
    bar = tqdm(total=sum(2 * _numel(s) for s in shapes.values()), unit="B", unit_scale=True,
               desc="writing weights", disable=not progress)
    for name, shape in shapes.items():
        t = random_tensor(_source(name, tied=tied), shape, seed=seed)
        dim = meta_split_dim(name)
        for i, m in enumerate(mapped):
            m[name].copy_(t if dim is None else t.chunk(n_shards, dim=dim)[i])
            release_pages(m[name])
        bar.update(t.numel() * 2)
        del t
    bar.close()
    del mapped
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")


# ---- CLI ----------------------------------------------------------------------------------------
def _configs(args) -> tuple[dict | None, dict | None, int, bool]:
    """(HF config, Meta params, Meta shards, tied) of the preset or the --config file."""
    if args.preset:
        hf, params, shards = PRESETS[args.preset]
        return hf, params, shards, hf["tie_word_embeddings"]
    raw = json.loads(args.config.read_text(encoding="utf-8"))
    if "hidden_size" in raw:
        return raw, None, 1, bool(raw.get("tie_word_embeddings"))
    return None, raw, 1, args.tied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config", type=Path, help="an HF config.json (--format hf) or Meta params.json (--format meta)")
    ap.add_argument("--format", choices=["hf", "meta"], default="hf")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to create (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true", help="write config.json / params.json only (for `plan`)")
    ap.add_argument("--max-shard-bytes", type=int, default=HF_SHARD_BYTES, help="HF shard split (default 5 GB)")
    ap.add_argument("--meta-shards", type=int, help="Meta model-parallel files (default: the preset's)")
    ap.add_argument("--tied", action="store_true",
                    help="Meta --config only: output.weight is a copy of the embedding (as in Llama 3.2)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    hf_config, params, n_shards, tied = _configs(args)
    n_shards = args.meta_shards or n_shards
    chosen = hf_config if args.format == "hf" else params
    if chosen is None:
        ap.error(f"{args.config} is not a {'config.json' if args.format == 'hf' else 'params.json'}; "
                 f"pass --format {'meta' if args.format == 'hf' else 'hf'}")
    if args.out.exists():
        ap.error(f"{args.out} exists; remove it or choose another --out")
    try:
        check_output_dir(args.out, what="--out")
        _write(args, chosen, tied=tied, n_shards=n_shards)
    except LlamaExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a quota, a file size limit: the staged folder is already gone
        print(f"error: cannot write {args.out} ({e.strerror or e}); free some space or choose another --out",
              file=sys.stderr)
        return 2
    return 0


def _write(args, chosen: dict, *, tied: bool, n_shards: int) -> None:
    with staged_dir(args.out) as tmp:  # complete, or not there at all
        if args.config_only:
            name = "config.json" if args.format == "hf" else "params.json"
            (tmp / name).write_text(json.dumps(chosen, indent=2) + "\n")
        elif args.format == "hf":
            write_hf(tmp, chosen, seed=args.seed, shard_bytes=args.max_shard_bytes, progress=not args.no_progress)
        else:
            write_meta(tmp, chosen, seed=args.seed, tied=tied, n_shards=n_shards, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
