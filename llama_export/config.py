"""Typed, frozen configuration. Meta (`params.json`) and Hugging Face (`config.json`) field names are
mapped here and nowhere else."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any

import torch

from llama_export import dtypes
from llama_export.errors import ConfigError


class Precision(str, enum.Enum):
    """Element type of activations, and of weights unless a `WeightQuant` quantizes them."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.by_precision(self.value).torch


@dataclass(frozen=True)
class WeightQuant:
    """Weight-only quantization: `bits`-bit integers in blocks of `block_size` input features per output
    channel, symmetric (zero point 0), one scale per block in the activation dtype (`model.quantize` has
    the formula). Which weights: every 2-D weight of the layers, the output projection if `output`, the
    embedding table (blocks along the model dimension) if `embedding`; norms never."""

    bits: int
    block_size: int = 32
    output: bool = True
    embedding: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"weight bits={self.bits} is not supported; use 8 (int8) or 4 (int4)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size {self.block_size} must be a power of two >= 16 (e.g. 32, 64, 128)")

    @property
    def name(self) -> str:
        """'int4', 'int8'; a block size other than 32 is spelled: 'int4b128'."""
        return f"int{self.bits}" + ("" if self.block_size == 32 else f"b{self.block_size}")

    def quantizes(self, param: str) -> bool:
        """Whether parameter `param` (a Meta name, e.g. `layers.0.attention.wq.weight`) is quantized."""
        if param == "tok_embeddings.weight":
            return self.embedding
        if param == "output.weight":
            return self.output
        return param.startswith("layers.") and not param.endswith("norm.weight")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "symmetric": True}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightQuant:
        d = dict(d)
        if not d.pop("symmetric", True):
            raise ConfigError("this export uses asymmetric weight quantization, which this version cannot run")
        return cls(**d)


@dataclass(frozen=True)
class ModelDType:
    """A `--dtype` value: the activation precision and, when weights are quantized, their scheme.

    'fp32' 'fp16' 'bf16': weights and activations of that type. 'int8' 'int4': int8 / int4 weights
    (block 32; `--block-size` and friends adjust `weights`) with fp32 activations; 'int8-fp16',
    'int4-bf16', ...: with other activations."""

    activations: Precision
    weights: WeightQuant | None = None

    @classmethod
    def parse(cls, text: str) -> ModelDType:
        bits, _, act = text.partition("-")
        try:
            if bits in ("int8", "int4"):
                return cls(Precision(act or "fp32"), WeightQuant(int(bits[3:])))
            if not act:
                return cls(Precision(bits))
        except ValueError:
            pass
        raise ConfigError(f"unknown dtype {text!r}; use fp32, fp16, bf16, int8, int4, or int8-/int4- and the "
                          "activation dtype (int4-fp16)")

    def __str__(self) -> str:
        """'fp16', 'int4-fp32', 'int4b128-fp32': the variant's dtype part."""
        act = self.activations.value
        return act if self.weights is None else f"{self.weights.name}-{act}"


DTYPE_CHOICES = ("fp32", "fp16", "bf16", "int8", "int4", "int8-fp16", "int4-fp16")  # shown in --help


class Backend(str, enum.Enum):
    """Execution backends behind the one runner interface."""

    EAGER = "eager"
    ORT = "ort"
    TENSORRT = "trt"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size exactly as Meta's `FeedForward.__init__` derives it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family model; every field is resolved (no sentinels)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    head_dim: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} (GQA groups must be equal)"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def num_parameters(self) -> int:
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        out = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + out

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # ---- Meta params.json ----------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, params: dict[str, Any], *, max_seq_len: int = 2048) -> ModelConfig:
        """Build from Meta's `params.json` (LLaMA 1/2/3/3.1)."""
        try:
            dim, n_heads = int(params["dim"]), int(params["n_heads"])
            vocab = int(params["vocab_size"])
            if vocab <= 0:
                raise ConfigError(
                    f"params.json has vocab_size={vocab} (LLaMA 1 wrote -1); set it to the tokenizer's size"
                )
            scaling = None
            if params.get("use_scaled_rope"):
                # Meta's Llama 3.1 reference code hard-codes factor 8, low 1, high 4, original 8192
                # (apply_scaling in model.py); a "rope_scaling" dict or a "rope_scaling_factor" key
                # (later llama-models releases) overrides them.
                fields = dict(params.get("rope_scaling") or {})
                if params.get("rope_scaling_factor") is not None:
                    fields["factor"] = float(params["rope_scaling_factor"])
                scaling = RopeScaling(**fields)
            return cls(
                dim=dim,
                n_layers=int(params["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads),
                vocab_size=vocab,
                hidden_dim=meta_ffn_hidden_dim(
                    dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
                ),
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                max_seq_len=int(params.get("max_seq_len", max_seq_len)),
            )
        except KeyError as e:
            raise ConfigError(f"params.json lacks required field {e.args[0]!r}") from None

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, max_seq_len: int | None = None) -> ModelConfig:
        """Build from a Hugging Face `LlamaConfig` dict (transformers 4.x and 5.x spellings)."""
        try:
            n_heads = int(cfg["num_attention_heads"])
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            scaling = None
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            elif rope_type not in ("default", None):
                raise ConfigError(f"unsupported rope_type={rope_type!r}; supported: default, llama3")
            return cls(
                dim=int(cfg["hidden_size"]),
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                vocab_size=int(cfg["vocab_size"]),
                hidden_dim=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=int(max_seq_len or cfg.get("max_position_embeddings", 2048)),
                head_dim=cfg.get("head_dim"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None


def load_json(path) -> dict[str, Any]:
    """Read a JSON file, turning decode errors into a ConfigError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None
