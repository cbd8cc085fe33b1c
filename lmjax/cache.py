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
  """Keys and values of every decoder layer.

  With `scan_layers` the layers are stacked in one array `[L, B, K, S, H]` (what `nn.scan`
  carries); unrolled, `k` and `v` are tuples of L arrays `[B, K, S, H]`, so each layer's update
  is written in place inside a compiled decode loop instead of copying the whole stack.

  Attributes:
    k, v: self-attention keys and values (S next to H, so decode reads each head's keys
      contiguously); slot j of row b holds the token written j-th for that row.
    lengths: `[B]` int32, how many tokens each row has taken: the filled slots while
      `lengths <= max_len`. A write past the last slot is dropped, not clamped onto earlier
      slots, and `lengths` keeps counting past `max_len` so the overflow stays visible
      (`overflowed`): the model gives such a row NaN logits, now and at every later step.
    cross_k, cross_v: `Seq2SeqLM` only, the encoder output projected per layer, laid out as
      `k` (`[B, K, Se, H]` per layer).
    cross_segment_ids: `Seq2SeqLM` only, `[B, Se]`, 0 where the encoder input was padding.
  """

  k: Array
  v: Array
  lengths: Array
  cross_k: Array | None = None
  cross_v: Array | None = None
  cross_segment_ids: Array | None = None

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def max_len(self) -> int:
    """Slots S per row."""
    return self.k.shape[3] if self.stacked else self.k[0].shape[2]

  @property
  def encoder_len(self) -> int | None:
    """Se, the encoder input length the cross-attention slots hold (None: no encoder)."""
    if self.cross_k is None:
      return None
    return self.cross_k.shape[3] if self.stacked else self.cross_k[0].shape[2]

  @property
  def overflowed(self) -> Array:
    """`[B]` bool: rows that were given more tokens than the cache has slots (lost keys)."""
    return self.lengths > self.max_len

  def repeat_rows(self, n: int) -> KVCache:
    """Each row repeated n times in place (row b becomes rows b*n .. b*n+n-1)."""
    axis = 1 if self.stacked else 0

    def rep(x, ax):
      return jnp.repeat(x, n, axis=ax)
    layers = lambda t: jax.tree.map(lambda x: rep(x, axis), t)  # noqa: E731
    return self.replace(
        k=layers(self.k), v=layers(self.v), lengths=rep(self.lengths, 0),
        cross_k=layers(self.cross_k), cross_v=layers(self.cross_v),
        cross_segment_ids=None if self.cross_segment_ids is None else rep(
            self.cross_segment_ids, 0))


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
  n_layers = config.num_decoder_layers
  kh, h = config.resolved_num_kv_heads, config.resolved_head_dim

  def zeros(length):
    if config.scan_layers:
      return jnp.zeros((n_layers, batch, kh, length, h), dt)
    return tuple(jnp.zeros((batch, kh, length, h), dt) for _ in range(n_layers))

  cache = KVCache(k=zeros(max_len), v=zeros(max_len), lengths=jnp.zeros((batch,), jnp.int32))
  if config.num_encoder_layers > 0:
    if encoder_len is None:
      raise ValueError("init_cache for an encoder-decoder model needs encoder_len")
    cache = cache.replace(cross_k=zeros(encoder_len), cross_v=zeros(encoder_len),
                          cross_segment_ids=jnp.zeros((batch, encoder_len), jnp.int32))
  return cache


def write(cache_kv: Array, new: Array, starts: Array) -> Array:
  """Writes `new` `[B, T, K, H]` into one layer's `[B, K, S, H]` at each row's own slot.

  Row b's tokens go to slots `starts[b] .. starts[b] + T - 1`; slots past S are dropped, never
  clamped onto earlier ones (the model flags a row whose real tokens are dropped and gives it
  NaN logits; a padding token's dropped write loses nothing). One scatter: a vmapped
  dynamic_update_slice became, after XLA's CPU fusion, two fused updates of the same buffer
  (one for attention, one for the loop carry) and so four copies of every layer's cache per
  decode step.
  """
  b, t, k, _ = new.shape
  rows = jnp.arange(b)[:, None, None]
  heads = jnp.arange(k)[None, None, :]
  slots = (starts[:, None] + jnp.arange(t)[None, :])[:, :, None]
  return cache_kv.at[rows, heads, slots].set(new.astype(cache_kv.dtype), mode="drop")


def to_cache_layout(x: Array) -> Array:
  """`[B, S, K, H]` keys or values -> the cache's `[B, K, S, H]`."""
  return x.transpose(0, 2, 1, 3)
