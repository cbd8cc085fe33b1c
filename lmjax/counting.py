"""Parameter counts and training FLOPs per token (for MFU, as in Chowdhery et al., 2022, PaLM)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import TransformerConfig
from lmjax.transformer import CausalLM, MaskedLM, Seq2SeqLM


def model_for(config: TransformerConfig) -> nn.Module:
  """The model family a config describes: encoder-only, decoder-only or encoder-decoder."""
  if config.num_encoder_layers and config.num_decoder_layers:
    return Seq2SeqLM(config)
  return MaskedLM(config) if config.num_encoder_layers else CausalLM(config)


def example_inputs(config: TransformerConfig, batch: int = 1, length: int = 8) -> tuple:
  """Token ids that `model_for(config).init` accepts."""
  tokens = jnp.zeros((batch, min(length, config.max_len)), jnp.int32)
  if config.num_encoder_layers and config.num_decoder_layers:
    return (tokens, tokens)
  return (tokens,)


def init_fn(config: TransformerConfig, seed: int = 0):
  """A function of no arguments returning the boxed params (with their logical axis names) that
  `model_for(config).init` makes: for `jax.eval_shape` and `lmjax.sharding.param_shardings`."""
  model = model_for(config)
  def init():
    return model.init(jax.random.key(seed), *example_inputs(config))["params"]
  return init


def abstract_params(config: TransformerConfig):
  """The params tree of `model_for(config)` as `jax.ShapeDtypeStruct`s (no memory used).

  Traced with the reference attention: params do not depend on the attention kernel, so a
  config naming one not registered in this process (`"flash"`) still counts."""
  return nn.meta.unbox(jax.eval_shape(init_fn(config.replace(attention="reference"))))


def count_params(params_or_config) -> int:
  """Number of parameters in a params tree, or of the model a config describes."""
  tree = params_or_config
  if isinstance(tree, TransformerConfig):
    tree = abstract_params(tree)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def matmul_params(config: TransformerConfig) -> int:
  """Weights used in matmuls per token: every kernel, plus the tied output embedding."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
  n = 0
  for path, x in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      n += int(np.prod(x.shape))
  if config.tie_embeddings:
    n += config.vocab_size * config.model_dim
  return n


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul weights + 12 x layers x seq_len x attention width.

  The attention term counts QK^T and PV forward and backward without halving for causality
  (PaLM's convention). For an encoder-decoder, a "token" is one encoder plus one decoder
  position and cross-attention is counted like self-attention.
  """
  layers = config.num_encoder_layers + config.num_decoder_layers
  if config.num_encoder_layers and config.num_decoder_layers:
    layers += config.num_decoder_layers  # cross-attention
  width = config.num_heads * config.resolved_head_dim
  return 6.0 * matmul_params(config) + 12.0 * layers * seq_len * width
