"""The one model configuration: a frozen dataclass, validated on creation, with named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned", "rotary", "none")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# Rotary frequency scaling: none, or Llama 3.1's (long wavelengths slowed by `rope_scaling_factor`,
# short ones kept, a smooth blend between; Meta's Llama 3 paper and reference code, 2024).
ROPE_SCALINGS = ("none", "llama3")
# Attention names always accepted: the reference, and the Pallas kernel that `infer` registers
# ("flash"). Others are accepted once registered with `lmjax.attention_ops.register_attention`.
ATTENTIONS = ("reference", "flash")


def _one_of(field: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(f"TransformerConfig.{field}={value!r} is not allowed; choose one of {allowed}")


def attention_names() -> tuple[str, ...]:
  """The names `TransformerConfig.attention` accepts now: `ATTENTIONS` and any registered."""
  from lmjax import attention_ops  # Deferred: attention_ops imports jax and lmjax.layers.

  return tuple(dict.fromkeys((*ATTENTIONS, *sorted(attention_ops._ATTENTION_FNS))))


def _positive(field: str, value: Any, allow_zero: bool = False) -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"TransformerConfig.{field}={value!r} must be an int {bound}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Every architectural choice of the three model families (`CausalLM`, `MaskedLM`, `Seq2SeqLM`).

  `num_encoder_layers` > 0 and `num_decoder_layers` == 0 is encoder-only, the reverse is
  decoder-only, both > 0 is encoder-decoder. `num_kv_heads` below `num_heads` gives GQA
  (Ainslie et al., 2023), 1 gives MQA (Shazeer, 2019). Unset `num_kv_heads` and `head_dim`
  default to `num_heads` and `model_dim // num_heads`.
  """

  vocab_size: int = 256
  model_dim: int = 64
  num_encoder_layers: int = 0
  num_decoder_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  ffn_dim: int = 256
  activation: str = "gelu"
  norm: str = "layernorm"
  norm_placement: str = "pre"
  norm_eps: float = 1e-5
  embed_norm: bool = False  # a norm right after the embeddings (BERT)
  position: str = "learned"
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"  # "llama3": the rope_* fields below take effect
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_len: int = 128
  use_bias: bool = True  # biases in attention, feed-forward and LayerNorm
  qkv_bias: bool | None = None  # biases on the q, k, v projections only (Qwen2); None: use_bias
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # multiply token embeddings by sqrt(model_dim) (Vaswani 2017)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False
  attention: str = "reference"  # a name registered in lmjax.attention_ops ("flash" from infer)

  def __post_init__(self):
    _positive("vocab_size", self.vocab_size)
    _positive("model_dim", self.model_dim)
    _positive("num_encoder_layers", self.num_encoder_layers, allow_zero=True)
    _positive("num_decoder_layers", self.num_decoder_layers, allow_zero=True)
    if self.num_encoder_layers + self.num_decoder_layers == 0:
      raise ValueError("TransformerConfig needs num_encoder_layers > 0 or num_decoder_layers > 0")
    _positive("num_heads", self.num_heads)
    _positive("ffn_dim", self.ffn_dim)
    _positive("max_len", self.max_len)
    if self.head_dim is None and self.model_dim % self.num_heads:
      raise ValueError(
          f"TransformerConfig.num_heads={self.num_heads} must divide model_dim={self.model_dim} "
          "(or set head_dim explicitly)")
    if self.head_dim is not None:
      _positive("head_dim", self.head_dim)
    if self.num_kv_heads is not None:
      _positive("num_kv_heads", self.num_kv_heads)
      if self.num_heads % self.num_kv_heads:
        raise ValueError(
            f"TransformerConfig.num_kv_heads={self.num_kv_heads} must divide "
            f"num_heads={self.num_heads} (1 = MQA, num_heads = MHA)")
    if self.position == "rotary" and self.resolved_head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
    _one_of("activation", self.activation, ACTIVATIONS)
    _one_of("norm", self.norm, NORMS)
    _one_of("norm_placement", self.norm_placement, NORM_PLACEMENTS)
    _one_of("position", self.position, POSITIONS)
    _one_of("dtype", self.dtype, DTYPES)
    _one_of("param_dtype", self.param_dtype, DTYPES)
    _one_of("remat_policy", self.remat_policy, REMAT_POLICIES)
    for name in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, name)
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"TransformerConfig.{name}={rate} must be in [0, 1)")
    if self.norm_eps <= 0:
      raise ValueError(f"TransformerConfig.norm_eps={self.norm_eps} must be > 0")
    if self.rope_theta <= 0:
      raise ValueError(f"TransformerConfig.rope_theta={self.rope_theta} must be > 0")
    _one_of("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    if self.rope_scaling != "none" and not (
        self.rope_scaling_factor >= 1.0
        and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ValueError(
          f"rope_scaling={self.rope_scaling!r} needs rope_scaling_factor >= 1 and 0 < "
          f"rope_low_freq_factor < rope_high_freq_factor, got {self.rope_scaling_factor}, "
          f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")
    _positive("rope_original_max_len", self.rope_original_max_len)
    allowed = attention_names()
    if not isinstance(self.attention, str) or self.attention not in allowed:
      raise ValueError(
          f"TransformerConfig.attention={self.attention!r} is not allowed; choose one of "
          f"{allowed} (register another kernel first with "
          "lmjax.attention_ops.register_attention(name, fn))")

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.model_dim // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def resolved_qkv_bias(self) -> bool:
    return self.use_bias if self.qkv_bias is None else self.qkv_bias

  @property
  def rope_scaling_params(self) -> tuple[float, float, float, int] | None:
    """`(factor, low_freq_factor, high_freq_factor, original_max_len)` of Llama 3 rotary
    scaling, or None for plain rotary positions."""
    if self.rope_scaling == "none":
      return None
    return (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
            self.rope_original_max_len)

  @property
  def gated(self) -> bool:
    return self.activation in GATED_ACTIVATIONS

  def replace(self, **overrides) -> TransformerConfig:
    """A copy with some fields changed (validated again)."""
    _check_keys(overrides)
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
    _check_keys(d)
    return cls(**d)

  @classmethod
  def from_preset(cls, name: str, **overrides) -> TransformerConfig:
    """A named preset (see `PRESETS`), with fields overridden by keyword."""
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    _check_keys(overrides)
    return cls(**{**PRESETS[name], **overrides})


def _check_keys(d: dict[str, Any]) -> None:
  names = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown TransformerConfig field(s) {unknown}; fields are {sorted(names)}")


# What the Llama 3 and Qwen2.5 families share (their config.json files).
_LLAMA3 = dict(
    vocab_size=128256, activation="swiglu", norm="rmsnorm", norm_placement="pre", norm_eps=1e-5,
    position="rotary", rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
    max_len=131072, use_bias=False)
_QWEN25 = dict(
    activation="swiglu", norm="rmsnorm", norm_placement="pre", norm_eps=1e-6, position="rotary",
    rope_theta=1_000_000.0, max_len=32768, use_bias=False, qkv_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for tests: a decoder-only model; give num_encoder_layers for the others.
    "tiny": dict(
        vocab_size=256, model_dim=64, num_decoder_layers=2, num_heads=4, num_kv_heads=2,
        ffn_dim=128, activation="swiglu", norm="rmsnorm", position="rotary", max_len=128,
        use_bias=False, norm_eps=1e-6),
    # Vaswani et al. 2017, base model: 6+6 layers, 512 wide, 8 heads, 2048 FFN, post-norm.
    "transformer-base": dict(
        vocab_size=37000, model_dim=512, num_encoder_layers=6, num_decoder_layers=6,
        num_heads=8, ffn_dim=2048, activation="relu", norm="layernorm", norm_placement="post",
        norm_eps=1e-6, position="sinusoidal", max_len=512, dropout_rate=0.1,
        attention_dropout_rate=0.0, tie_embeddings=True, scale_embeddings=True),
    # Devlin et al. 2019, BERT-base (no token types, no pooler).
    "bert-base": dict(
        vocab_size=30522, model_dim=768, num_encoder_layers=12, num_decoder_layers=0,
        num_heads=12, ffn_dim=3072, activation="gelu", norm="layernorm", norm_placement="post",
        norm_eps=1e-12, embed_norm=True, position="learned", max_len=512, dropout_rate=0.1,
        attention_dropout_rate=0.1, tie_embeddings=True),
    # Radford et al. 2019, GPT-2 small: 124,439,808 parameters.
    "gpt2-124m": dict(
        vocab_size=50257, model_dim=768, num_decoder_layers=12, num_heads=12, ffn_dim=3072,
        activation="gelu_tanh", norm="layernorm", norm_placement="pre", norm_eps=1e-5,
        position="learned", max_len=1024, use_bias=True, tie_embeddings=True),
    # SmolLM2-135M (Hugging Face, 2024): Llama architecture, 134,515,008 parameters.
    "smollm2-135m": dict(
        vocab_size=49152, model_dim=576, num_decoder_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, ffn_dim=1536, activation="swiglu", norm="rmsnorm", norm_placement="pre",
        norm_eps=1e-5, position="rotary", rope_theta=100_000.0, max_len=8192, use_bias=False,
        tie_embeddings=True),
    # A ~17M student / speculative drafter with SmolLM2's vocabulary (train.distill's demo).
    "smollm2-student": dict(
        vocab_size=49152, model_dim=256, num_decoder_layers=6, num_heads=4, num_kv_heads=2,
        head_dim=64, ffn_dim=768, activation="swiglu", norm="rmsnorm", norm_placement="pre",
        norm_eps=1e-5, position="rotary", rope_theta=100_000.0, max_len=2048, use_bias=False,
        tie_embeddings=True),
    # Llama 3.2 1B (Meta, 2024): 1,235,814,400 parameters (tied embeddings), 128K context by
    # Llama 3 rotary scaling (factor 32 over an 8K original context).
    "llama3.2-1b": dict(
        _LLAMA3, model_dim=2048, num_decoder_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, ffn_dim=8192, tie_embeddings=True, rope_scaling_factor=32.0),
    # Llama 3.1 8B (Meta, 2024): 8,030,261,248 parameters.
    "llama3.1-8b": dict(
        _LLAMA3, model_dim=4096, num_decoder_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, ffn_dim=14336, tie_embeddings=False),
    # Llama 3.1 70B (Meta, 2024): 70,553,706,496 parameters.
    "llama3.1-70b": dict(
        _LLAMA3, model_dim=8192, num_decoder_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, ffn_dim=28672, tie_embeddings=False),
    # Qwen2.5 0.5B (Qwen team, 2024): 494,032,768 parameters; q/k/v biases, tied embeddings.
    "qwen2.5-0.5b": dict(
        _QWEN25, vocab_size=151936, model_dim=896, num_decoder_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, ffn_dim=4864, tie_embeddings=True),
    # Qwen2.5 7B (Qwen team, 2024): 7,615,616,512 parameters.
    "qwen2.5-7b": dict(
        _QWEN25, vocab_size=152064, model_dim=3584, num_decoder_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, ffn_dim=18944, tie_embeddings=False),
}
