"""The explicit KV cache: a pytree passed into the model and returned updated.

No mutable linen collection: prefix caching and speculative decoding move these plain arrays.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lmjax.config import TransformerConfig
from lmjax.layers import dtype_of

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Keys and values of every decoder layer, stacked over layers.

  Attributes:
    k, v: self-attention keys and values `[L, B, K, S, H]` (S next to H, so decode reads each
      head's keys contiguously); slot j of row b holds the token written j-th for that row.
    lengths: `[B]` int32, how many slots of each row are filled.
    cross_k, cross_v: `Seq2SeqLM` only, the encoder output projected per layer `[L, B, K, Se, H]`.
    cross_segment_ids: `Seq2SeqLM` only, `[B, Se]`, 0 where the encoder input was padding.
  """

  k: Array
  v: Array
  lengths: Array
  cross_k: Array | None = None
  cross_v: Array | None = None
  cross_segment_ids: Array | None = None

  @property
  def max_len(self) -> int:
    return self.k.shape[3]


def init_cache(config: TransformerConfig, batch: int, max_len: int, *,
               encoder_len: int | None = None, dtype=None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens.

  Args:
    config: the model's config (a decoder is required).
    batch: rows B.
    max_len: slots S per row (prompt plus new tokens).
    encoder_len: Se, for an encoder-decoder model: the padded encoder input length.
    dtype: cache dtype; default the compute dtype.

  Returns:
    A `KVCache` of zeros with `lengths` 0.
  """
  if config.num_decoder_layers == 0:
    raise ValueError("init_cache needs a model with a decoder (num_decoder_layers > 0)")
  if max_len <= 0 or batch <= 0:
    raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch}, {max_len}")
  dt = dtype_of(config.dtype) if dtype is None else jnp.dtype(dtype)
  shape = (config.num_decoder_layers, batch, config.resolved_num_kv_heads, max_len,
           config.resolved_head_dim)
  cache = KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                  lengths=jnp.zeros((batch,), jnp.int32))
  if config.num_encoder_layers > 0:
    if encoder_len is None:
      raise ValueError("init_cache for an encoder-decoder model needs encoder_len")
    cshape = shape[:3] + (encoder_len,) + shape[4:]
    cache = cache.replace(cross_k=jnp.zeros(cshape, dt), cross_v=jnp.zeros(cshape, dt),
                          cross_segment_ids=jnp.zeros((batch, encoder_len), jnp.int32))
  return cache


def write(cache_kv: Array, new: Array, starts: Array) -> Array:
  """Writes `new` `[B, T, K, H]` into one layer's `[B, K, S, H]` at each row's own slot."""
  def one(c, n, s):  # c [K, S, H], n [T, K, H]
    return jax.lax.dynamic_update_slice(c, n.transpose(1, 0, 2).astype(c.dtype), (0, s, 0))
  return jax.vmap(one)(cache_kv, new, starts)


def to_cache_layout(x: Array) -> Array:
  """`[B, S, K, H]` keys or values -> the cache's `[B, K, S, H]`."""
  return x.transpose(0, 2, 1, 3)
