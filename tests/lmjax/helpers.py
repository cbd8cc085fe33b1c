"""Small configs and init helpers shared by the core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import lmjax

DECODER = dict(vocab_size=97, model_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
               num_decoder_layers=2, max_len=64)


def tiny(family: str = "causal", **overrides) -> lmjax.TransformerConfig:
  """A tiny config of one family: "causal", "masked" or "seq2seq"."""
  base = dict(DECODER)
  if family == "masked":
    base.update(num_encoder_layers=2, num_decoder_layers=0, norm_placement="post",
                activation="gelu", norm="layernorm", position="learned", embed_norm=True)
  elif family == "seq2seq":
    base.update(num_encoder_layers=2, num_decoder_layers=2, activation="relu",
                position="sinusoidal", norm_placement="post", scale_embeddings=True)
  else:
    base.update(activation="swiglu", norm="rmsnorm", position="rotary", use_bias=False)
  base.update(overrides)
  return lmjax.TransformerConfig(**base)


def init(cfg: lmjax.TransformerConfig, *inputs, seed: int = 0):
  model = lmjax.model_for(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(seed), *inputs)["params"])
  return model, params


def tokens(key, b: int, t: int, vocab: int = 97):
  return jax.random.randint(jax.random.key(key), (b, t), 1, vocab, jnp.int32)
