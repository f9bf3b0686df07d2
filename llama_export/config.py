"""Typed, frozen configuration. Meta (`params.json`), Hugging Face (`config.json`) and GGUF (`llama.*`
metadata) field names are mapped here and nowhere else.

Each file is parsed strictly into its own schema (`MetaParams`, `HFConfig`) before it becomes a
`ModelConfig`; the ranges below hold for both files and for `ModelConfig` itself, so a value that would
make a model silently wrong (0 layers, a NaN or non-positive `rope_theta`/`norm_eps`, a truncated float)
is refused with the file, field, value and fix.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llama_export import dtypes
from llama_export.errors import ConfigError
from llama_export.parsing import check_fields, parse_json_file, parse_value

if TYPE_CHECKING:
    import torch


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
    channel, one scale per block in the activation dtype, and unless `symmetric` one integer zero point
    per block; `search`: each block's scale (and zero point) minimizes its squared error over a few
    clipped ranges instead of covering the block's full range (`model.quantize` has the formulas).
    Which weights: every 2-D weight of the layers, the output projection if `output`, the embedding table
    (blocks along the model dimension) if `embedding`; norms never. `output_bits`: the output
    projection's (and a quantized embedding's) bits where they differ from `bits` (8: symmetric int8, as
    llama.cpp's Q4_0 and Q4_K_M keep a model's output / tied embedding at 8 bits); None: `bits`."""

    bits: int
    block_size: int = 32
    output: bool = True
    embedding: bool = False
    symmetric: bool = True
    search: bool = False
    output_bits: int | None = None

    def __post_init__(self) -> None:
        for bits in (self.bits, self.output_bits or self.bits):
            if bits not in (4, 8):
                raise ConfigError(f"weight bits={bits} is not supported; use 8 (int8) or 4 (int4)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size {self.block_size} must be a power of two >= 16 (e.g. 32, 64, 128)")

    @property
    def name(self) -> str:
        """'int4', 'int8'; a block size other than 32 is spelled: 'int4b128'."""
        return f"int{self.bits}" + ("" if self.block_size == 32 else f"b{self.block_size}")

    def at(self, param: str) -> WeightQuant:
        """The scheme parameter `param` is quantized with: this one, or for the output projection and
        the embedding with `output_bits` set, int8 symmetric in the same blocks."""
        if self.output_bits in (None, self.bits) or param not in ("output.weight", "tok_embeddings.weight"):
            return self
        return WeightQuant(self.output_bits, self.block_size, self.output, self.embedding)

    @property
    def quantizer(self) -> dict[str, Any]:
        """The keyword arguments of `model.quantize.quantize_blocks` for this scheme."""
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "search": self.search}

    def quantizes(self, param: str) -> bool:
        """Whether parameter `param` (a Meta name, e.g. `layers.0.attention.wq.weight`) is quantized."""
        if param == "tok_embeddings.weight":
            return self.embedding
        if param == "output.weight":
            return self.output
        return param.startswith("layers.") and not param.endswith("norm.weight")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightQuant:
        """The scheme a manifest records; exports written before `search` existed used the plain range
        and one bit width."""
        return cls(**{"search": False, "output_bits": None, **d})

    @classmethod
    def default(cls, bits: int) -> WeightQuant:
        """`--dtype int4` / `int8`: the scheme each means unless options say otherwise. int4: asymmetric
        full-range blocks, output projection int8 (SmolLM2-135M on GPL-3 through ONNX Runtime: perplexity
        +28 % / +34 % over fp32 in blocks of 32 / 64 where symmetric int4 with an int4 output gave +52 % /
        +91 %; the searched range made it worse; docs/quantization.md); int8: symmetric full range."""
        return cls(bits) if bits == 8 else cls(bits, symmetric=False, output_bits=8)


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
                return cls(Precision(act or "fp32"), WeightQuant.default(int(bits[3:])))
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


# Ranges: generous bounds around every published LLaMA (Llama 3.1 405B: dim 16384, 126 layers, 128
# heads, FFN 53248, vocabulary 128256, context 131072). A value outside them is a typo, not a model.
Width = Annotated[int, Field(ge=1, le=1 << 20)]  # dim, FFN hidden size, multiple_of
LayerCount = Annotated[int, Field(ge=1, le=1024)]
HeadCount = Annotated[int, Field(ge=1, le=4096)]
HeadDim = Annotated[int, Field(ge=2, le=4096)]
VocabSize = Annotated[int, Field(ge=1, le=1 << 24)]
MAX_CONTEXT = 1 << 24  # the largest context (tokens) a config may declare
MAX_TP = 1024  # the largest tensor-parallel degree
ContextLength = Annotated[int, Field(ge=2, le=MAX_CONTEXT)]  # room for a prompt token and a new one
TPDegree = Annotated[int, Field(ge=1, le=MAX_TP)]
NormEps = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
RopeTheta = Annotated[float, Field(gt=1, allow_inf_nan=False)]  # base**(-2i/d): <= 1 is no RoPE
ScaleFactor = Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)]
FreqFactor = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
FfnMultiplier = Annotated[float, Field(gt=0, le=64, allow_inf_nan=False)]

CHECKPOINT_FIX = "fix the file to describe these weights (see the model's original)"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: ScaleFactor = 8.0
    low_freq_factor: FreqFactor = 1.0
    high_freq_factor: FreqFactor = 4.0
    original_max_position_embeddings: ContextLength = 8192

    def __post_init__(self) -> None:
        check_fields(self)
        if self.high_freq_factor <= self.low_freq_factor:
            # Meta's apply_scaling divides by (high_freq_factor - low_freq_factor).
            raise ConfigError(f"rope scaling high_freq_factor={self.high_freq_factor} must be greater than "
                              f"low_freq_factor={self.low_freq_factor}")


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size exactly as Meta's `FeedForward.__init__` derives it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family model; every field is resolved (no sentinels) and range-checked."""

    dim: Width
    n_layers: LayerCount
    n_heads: HeadCount
    n_kv_heads: HeadCount
    vocab_size: VocabSize
    hidden_dim: Width
    norm_eps: NormEps = 1e-5
    rope_theta: RopeTheta = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: ContextLength = 2048
    head_dim: HeadDim | None = None
    tie_word_embeddings: bool = False

    __pydantic_config__ = ConfigDict(extra="forbid")  # a manifest's "model" holds exactly these fields

    def __post_init__(self) -> None:
        check_fields(self)
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Meta params.json ----------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, params: dict[str, Any] | MetaParams, *, max_seq_len: int | None = None,
                         source: str = "params.json") -> ModelConfig:
        """Build from Meta's `params.json` (LLaMA 1/2/3/3.1); `max_seq_len` overrides the file's."""
        p = params if isinstance(params, MetaParams) else parse_value(
            params, MetaParams, source=source, fix=CHECKPOINT_FIX)
        scaling = None
        if p.use_scaled_rope:
            # Meta's Llama 3.1 reference code hard-codes factor 8, low 1, high 4, original 8192
            # (apply_scaling in model.py); a "rope_scaling" dict or a "rope_scaling_factor" key
            # (later llama-models releases) overrides them.
            scaling = p.rope_scaling or RopeScaling()
            if p.rope_scaling_factor is not None:
                scaling = dataclasses.replace(scaling, factor=p.rope_scaling_factor)
        return _in_file_terms(source, META_NAMES, lambda: cls(
            dim=p.dim,
            n_layers=p.n_layers,
            n_heads=p.n_heads,
            n_kv_heads=p.n_kv_heads or p.n_heads,
            vocab_size=p.vocab_size,
            hidden_dim=meta_ffn_hidden_dim(p.dim, p.multiple_of, p.ffn_dim_multiplier),
            norm_eps=p.norm_eps,
            rope_theta=p.rope_theta,
            rope_scaling=scaling,
            max_seq_len=max_seq_len or p.max_seq_len or 2048,
        ))

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any] | HFConfig, *, max_seq_len: int | None = None,
                       source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `LlamaConfig` dict (transformers 4.x and 5.x spellings);
        `max_seq_len` overrides max_position_embeddings."""
        c = cfg if isinstance(cfg, HFConfig) else parse_value(cfg, HFConfig, source=source, fix=CHECKPOINT_FIX)
        rope = c.rope_parameters or c.rope_scaling or HFRope()
        rope_type = rope.rope_type or rope.type or "default"
        scaling = None
        if rope_type == "llama3":
            missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                       if getattr(rope, k) is None]
            if missing:
                raise ConfigError(f"{source}: rope_type 'llama3' needs {', '.join(missing)}; {CHECKPOINT_FIX}")
            scaling = _in_file_terms(source, HF_NAMES, lambda: RopeScaling(
                factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                original_max_position_embeddings=rope.original_max_position_embeddings))
        elif rope_type != "default":
            raise ConfigError(f"{source}: unsupported rope_type={rope_type!r}; supported: default, llama3")
        return _in_file_terms(source, HF_NAMES, lambda: cls(
            dim=c.hidden_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            vocab_size=c.vocab_size,
            hidden_dim=c.intermediate_size,
            norm_eps=c.rms_norm_eps,
            rope_theta=rope.rope_theta if rope.rope_theta is not None else c.rope_theta,
            rope_scaling=scaling,
            max_seq_len=max_seq_len or c.max_position_embeddings,
            head_dim=c.head_dim,
            tie_word_embeddings=c.tie_word_embeddings,
        ))


    # ---- GGUF metadata (llama.cpp) -------------------------------------------------------------
    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], *, n_tokens: int | None, tied: bool,
                  rope_scaling: RopeScaling | None = None, max_seq_len: int | None = None,
                  source: str = "the GGUF") -> ModelConfig:
        """Build from a LLaMA GGUF's `llama.*` metadata (llama.cpp's key names, `GGUFParams`). What the file
        says elsewhere is passed in: `n_tokens`, the length of tokenizer.ggml.tokens (the vocabulary, as
        llama.cpp counts it; None: `llama.vocab_size`); `tied`, no output.weight (llama.cpp then uses the
        embedding); `rope_scaling`, Llama-3.1 scaling recovered from rope_freqs.weight."""
        g = parse_value({k: v for k, v in metadata.items() if k.startswith("llama.")}, GGUFParams, source=source,
                        fix=GGUF_FIX)
        vocab = n_tokens if n_tokens is not None else g.vocab_size
        if vocab is None:
            raise ConfigError(f"{source} has neither tokenizer.ggml.tokens nor llama.vocab_size; {GGUF_FIX}")
        cfg = _in_file_terms(source, GGUF_NAMES, lambda: cls(
            dim=g.embedding_length,
            n_layers=g.block_count,
            n_heads=g.head_count,
            n_kv_heads=g.head_count_kv or g.head_count,
            vocab_size=vocab,
            hidden_dim=g.feed_forward_length,
            norm_eps=g.layer_norm_rms_epsilon,
            rope_theta=g.freq_base,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len or g.context_length,
            head_dim=g.key_length,
            tie_word_embeddings=tied,
        ))
        if g.value_length is not None and g.value_length != cfg.head_dim:
            raise ConfigError(f"{source}: llama.attention.value_length={g.value_length} differs from the key length "
                              f"{cfg.head_dim}; LLaMA's heads have one size, so this is not a LLaMA")
        if g.dimension_count is not None and g.dimension_count != cfg.head_dim:
            raise ConfigError(f"{source}: llama.rope.dimension_count={g.dimension_count} rotates part of each "
                              f"{cfg.head_dim}-wide head; only full-head RoPE (LLaMA's) is supported")
        return cfg


class _FileSchema(BaseModel):
    # Checkpoint configs carry many fields this tool does not use (architectures, torch_dtype, ...).
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, defer_build=True)


class MetaParams(_FileSchema):
    """Meta's `params.json`, as written by meta-llama/llama and llama-models."""

    dim: Width
    n_layers: LayerCount
    n_heads: HeadCount
    n_kv_heads: HeadCount | None = None
    vocab_size: VocabSize
    multiple_of: Width = 256
    ffn_dim_multiplier: FfnMultiplier | None = None
    norm_eps: NormEps = 1e-5
    rope_theta: RopeTheta = 10000.0
    use_scaled_rope: bool = False
    rope_scaling: RopeScaling | None = None
    rope_scaling_factor: ScaleFactor | None = None
    max_seq_len: ContextLength | None = None

    @field_validator("vocab_size", mode="before")
    @classmethod
    def _llama1_vocab(cls, v: Any) -> Any:
        if v == -1 and not isinstance(v, bool):
            raise ValueError("(LLaMA 1 wrote -1); set it to the tokenizer's size")
        return v


class HFRope(_FileSchema):
    """`rope_parameters` (transformers 5) or `rope_scaling` (4.x)."""

    rope_type: str | None = None
    type: str | None = None  # transformers 4.x before `rope_type`
    rope_theta: RopeTheta | None = None
    factor: ScaleFactor | None = None
    low_freq_factor: FreqFactor | None = None
    high_freq_factor: FreqFactor | None = None
    original_max_position_embeddings: ContextLength | None = None


class HFConfig(_FileSchema):
    """Hugging Face `config.json` of a `LlamaForCausalLM`."""

    hidden_size: Width
    num_hidden_layers: LayerCount
    num_attention_heads: HeadCount
    num_key_value_heads: HeadCount | None = None
    vocab_size: VocabSize
    intermediate_size: Width
    rms_norm_eps: NormEps = 1e-6
    rope_theta: RopeTheta = 10000.0
    rope_parameters: HFRope | None = None
    rope_scaling: HFRope | None = None
    max_position_embeddings: ContextLength = 2048
    head_dim: HeadDim | None = None
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = Field("silu", description="LLaMA's feed-forward is SwiGLU")
    attention_bias: Literal[False] = Field(False, description="LLaMA has no biases")
    mlp_bias: Literal[False] = Field(False, description="LLaMA has no biases")


GGUF_FIX = "convert the model again with llama.cpp's convert_hf_to_gguf.py"


def _gguf(key: str, **kw) -> Any:
    return Field(alias=f"llama.{key}", **kw)


class GGUFParams(_FileSchema):
    """A LLaMA GGUF's hyper-parameters: llama.cpp's `llama.*` metadata keys (gguf-py `Keys.LLM`/`Keys.Attention`/
    `Keys.Rope`), as `gguf_file.GGUFFile.metadata` holds them."""

    embedding_length: Width = _gguf("embedding_length")
    block_count: LayerCount = _gguf("block_count")
    head_count: HeadCount = _gguf("attention.head_count")
    head_count_kv: HeadCount | None = _gguf("attention.head_count_kv", default=None)
    feed_forward_length: Width = _gguf("feed_forward_length")
    layer_norm_rms_epsilon: NormEps = _gguf("attention.layer_norm_rms_epsilon")
    freq_base: RopeTheta = _gguf("rope.freq_base", default=10000.0)  # llama.cpp's default too
    context_length: ContextLength = _gguf("context_length")
    key_length: HeadDim | None = _gguf("attention.key_length", default=None)
    value_length: HeadDim | None = _gguf("attention.value_length", default=None)
    dimension_count: HeadDim | None = _gguf("rope.dimension_count", default=None)
    vocab_size: VocabSize | None = _gguf("vocab_size", default=None)
    rope_scaling_type: Literal["none"] | None = _gguf(
        "rope.scaling.type", default=None, description="linear and yarn scaling are not supported")


# ModelConfig field -> the file's spelling, for errors that involve several fields.
META_NAMES: dict[str, str] = {}
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings"}

GGUF_NAMES = {"dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
              "n_kv_heads": "llama.attention.head_count_kv", "hidden_dim": "llama.feed_forward_length",
              "norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
              "max_seq_len": "llama.context_length", "head_dim": "llama.attention.key_length"}

def _in_file_terms(source: str, names: dict[str, str], build):
    """Run `build()`; a ConfigError it raises is reworded with the file's field names and prefixed
    with the file."""
    try:
        return build()
    except ConfigError as e:
        msg = re.sub(r"\b(\w+)=", lambda m: f"{names.get(m.group(1), m.group(1))}=", str(e))
        raise ConfigError(f"{source}: {msg}; {CHECKPOINT_FIX}") from None


def read_meta_params(path: Path) -> MetaParams:
    return parse_json_file(path, MetaParams, fix=CHECKPOINT_FIX)


def read_hf_config(path: Path) -> HFConfig:
    return parse_json_file(path, HFConfig, fix=CHECKPOINT_FIX)

