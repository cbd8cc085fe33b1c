"""Token embeddings (with the tied output projection) and position encodings.

Sinusoidal and learned positions follow Vaswani et al., 2017; rotary positions follow
Su et al., 2021, "RoFormer", in the half-split layout of GPT-NeoX / Hugging Face Llama
(pair i of a head is dims (i, i + H/2)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import TransformerConfig
from lmjax.layers import DEFAULT_KERNEL_INIT, dtype_of, einsum_f32, param
from lmjax.sharding import constrain

Array = jax.Array


class TokenEmbedding(nn.Module):
  """Looks up `[B, T]` ids as `[B, T, D]`; `attend` is the tied output projection to `[B, T, V]`."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = param(self, "embedding", DEFAULT_KERNEL_INIT, (cfg.vocab_size, cfg.model_dim),
                           ("vocab", "embed"), dtype_of(cfg.param_dtype))

  def __call__(self, ids: Array) -> Array:
    # The table whole on its width (gathered like any fsdp weight before use), so the rows it
    # gives take the activations' batch/length split directly.
    table = constrain(self.embedding, ("vocab", None))
    x = jnp.take(table, ids, axis=0).astype(dtype_of(self.config.dtype))
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    if self.config.scale_embeddings:
      x = x * jnp.sqrt(jnp.asarray(self.config.model_dim, x.dtype))
    return x

  def attend(self, x: Array) -> Array:
    """Float32 logits `[B, T, V]` from hidden states `[B, T, D]`."""
    w = self.embedding.astype(x.dtype)
    return einsum_f32("BTD,VD->BTV", x, w)


def sinusoidal(positions: Array, dim: int, max_timescale: float = 10_000.0) -> Array:
  """Fixed sine/cosine encodings `[B, T, D]` of integer positions `[B, T]` (Vaswani et al.,
  2017, section 3.5): channel i < D/2 is sin(pos / 10000^(2i/D)), channel D/2 + i the cosine of
  the same angle (all sines, then all cosines, as tensor2tensor and Marian lay them out; the
  paper interleaves them, a fixed permutation of the channels). An odd D gets a zero last
  channel."""
  half = dim // 2
  inv = jnp.exp(-jnp.log(max_timescale) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv.reshape((1,) * positions.ndim + (-1,))
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if dim % 2:
    enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
  return enc


class LearnedPositions(nn.Module):
  """A learned table `[max_len, D]` indexed by positions `[B, T]`.

  A position outside `[0, max_len)` reads the nearest row (no NaN that a padding token could
  spread through attention's zero weights); the models flag a real token's such position and
  give its row NaN logits (see "Limits" in `lmjax.transformer`).
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, positions: Array) -> Array:
    cfg = self.config
    table = param(self, "embedding", DEFAULT_KERNEL_INIT, (cfg.max_len, cfg.model_dim),
                  (None, "embed"), dtype_of(cfg.param_dtype))
    return jnp.take(table, positions, axis=0, mode="clip").astype(dtype_of(cfg.dtype))


def rotary_inv_freq(head_dim: int, theta: float,
                    scaling: tuple[float, float, float, int] | None = None) -> Array:
  """The `[H/2]` rotary frequencies (float32, as transformers computes them), with Llama 3
  scaling when given.

  Llama 3 scaling `(factor, low, high, original_max_len)`: wavelengths longer than
  `original_max_len / low` are divided by `factor`, those shorter than `original_max_len / high`
  kept, and those between blended linearly in `original_max_len / wavelength`.
  """
  inv = 1.0 / (theta ** (jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))
  if scaling is None:
    return inv
  factor, low, high, original = scaling
  wavelength = 2 * np.pi / inv
  smooth = jnp.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
  return (1.0 - smooth) * inv / factor + smooth * inv


def apply_rotary(x: Array, positions: Array, theta: float,
                 scaling: tuple[float, float, float, int] | None = None) -> Array:
  """Rotates `[B, T, N, H]` queries or keys by their positions `[B, T]` (RoFormer, half-split;
  `scaling`: Llama 3's, see `rotary_inv_freq`).

  The rotation is computed in float32 and cast back, so attention scores depend on the
  difference of positions only.
  """
  h = x.shape[-1]
  half = h // 2
  inv = rotary_inv_freq(h, theta, scaling)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv[None, None, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
