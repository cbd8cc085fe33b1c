"""Multi-head attention (Vaswani et al., 2017) with GQA/MQA, self and cross, and the KV cache.

The score computation is injected: the module calls the attention function registered under
`config.attention` (see `lmjax.attention_ops`), so `infer.flash_attention` can replace the
reference without lmjax importing infer.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import cache as cache_lib
from lmjax.attention_ops import (
  SegmentIds,
  cached_attention,
  get_attention,
  grouped_attention,
  reference_attention,
)
from lmjax.config import TransformerConfig
from lmjax.embeddings import apply_rotary
from lmjax.layers import Einsum
from lmjax.sharding import check_sequence_split, constrain, sequence_shards

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CacheContext:
  """Where the new tokens go in the cache: rows start at `lengths` `[B]`, `n_new` `[B]` real."""

  lengths: Array
  n_new: Array
  prefill: bool = False


class MultiHeadAttention(nn.Module):
  """Self-attention (`cross=False`) or cross-attention to an encoder output (`cross=True`)."""

  config: TransformerConfig
  cross: bool = False
  causal: bool = False
  train: bool = False

  def _proj(self, name: str, heads: int, axis: str, bias: bool) -> Einsum:
    cfg = self.config
    return Einsum((cfg.model_dim, heads, cfg.resolved_head_dim), ("embed", axis, "head_dim"),
                  "BTD,DNH->BTNH", (axis, "head_dim") if bias else None, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, name=name)

  def _attend(self, q, k, v, **kw) -> Array:
    cfg = self.config
    if self.is_initializing() and sequence_shards() > 1:
      # `init` traces on example inputs (any length) only for the params' shapes: no checks.
      return reference_attention(q, k, v, **kw)
    if cfg.attention == "reference" and check_sequence_split(k.shape[1], "key length") > 1:
      # Context parallelism: each device keeps its block of queries and gathers all keys and
      # values over the mesh's sequence axis (the kernel's wrapper,
      # `infer.flash_attention.mesh_flash_attention`, does the same inside its shard_map).
      # Keys and values are repeated to the N query heads first: grouped attention folds the
      # G heads of a group into the query axis (head-major), which would gather the queries.
      g = q.shape[2] // k.shape[2]
      q = constrain(q, ("activation_batch", "activation_length", "heads", "head_dim"))
      kv_names = ("activation_batch", "activation_kv_length", "kv_heads", "head_dim")
      k, v = (constrain(jnp.repeat(constrain(a, kv_names), g, axis=2),
                        ("activation_batch", "activation_kv_length", "heads", "head_dim"))
              for a in (k, v))
    if self.train and cfg.attention_dropout_rate > 0.0:
      if cfg.attention != "reference":
        raise ValueError(f"attention_dropout_rate > 0 needs attention='reference', "
                         f"not {cfg.attention!r}")
      return reference_attention(q, k, v, dropout_rate=cfg.attention_dropout_rate,
                                 dropout_rng=self.make_rng("dropout"), **kw)
    return get_attention(cfg.attention)(q, k, v, **kw)

  @nn.compact
  def __call__(
      self, x: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
      encoder_out: Array | None = None, encoder_segment_ids: Array | None = None,
      layer_cache: tuple[Array, Array] | None = None, cache_ctx: CacheContext | None = None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """Attends from `x` `[B, T, D]`; returns `([B, T, D], updated (k, v) of this layer)`.

    Args:
      x: queries' input `[B, T, D]`.
      positions: `[B, T]` positions for rotary (self-attention only).
      segment_ids: `[B, T]` ids, 0 for padding; queries see only keys of their own segment.
      encoder_out: cross-attention keys' input `[B, Se, D]` (None: use `layer_cache`).
      encoder_segment_ids: `[B, Se]` for cross-attention.
      layer_cache: this layer's cached `(k, v)`, `[B, K, S, H]` each (cross: `[B, K, Se, H]`).
      cache_ctx: where the new tokens go in the cache.
    """
    cfg = self.config
    n, kh = cfg.num_heads, cfg.resolved_num_kv_heads
    qkv_bias = cfg.resolved_qkv_bias
    q = self._proj("query", n, "heads", qkv_bias)(x)
    b, t = x.shape[:2]
    if sequence_shards() > 1 and (layer_cache is not None or cache_ctx is not None):
      raise ValueError(f"a KV cache (decoding) cannot run on a mesh with sequence="
                       f"{sequence_shards()} (context parallelism is for training and "
                       "scoring); decode on a mesh with mesh.sequence=1")
    if not self.is_initializing():
      check_sequence_split(t, "query length")
    new_cache = None
    if self.cross:
      if encoder_out is None:  # decoding: the encoder's keys and values are in the cache
        if layer_cache is None:
          raise ValueError("cross-attention needs encoder_out or a filled cache")
        ck, cv = layer_cache
        seen = jnp.ones(ck.shape[2], bool)[None, :] if encoder_segment_ids is None else (
            encoder_segment_ids != 0)
        mask = jnp.broadcast_to(seen[:, None, :], (b, t, ck.shape[2]))
        out = grouped_attention(q, ck, cv, mask, "BKSH")
        new_cache = layer_cache
      else:
        k = self._proj("key", kh, "kv_heads", qkv_bias)(encoder_out)
        v = self._proj("value", kh, "kv_heads", qkv_bias)(encoder_out)
        if cache_ctx is not None:
          new_cache = (cache_lib.to_cache_layout(k), cache_lib.to_cache_layout(v))
        kv_seg = (jnp.ones(k.shape[:2], jnp.int32) if encoder_segment_ids is None
                  else encoder_segment_ids)
        q_seg = segment_ids
        if segment_ids is None or cache_ctx is not None:
          kv_seg = (kv_seg != 0).astype(jnp.int32)  # unpacked: queries see all real keys
          q_seg = jnp.ones((b, t), jnp.int32)
        out = self._attend(q, k, v, causal=False, segment_ids=SegmentIds(q_seg, kv_seg))
    else:
      k = self._proj("key", kh, "kv_heads", qkv_bias)(x)
      v = self._proj("value", kh, "kv_heads", qkv_bias)(x)
      if cfg.position == "rotary":
        q = apply_rotary(q, positions, cfg.rope_theta, cfg.rope_scaling_params)
        k = apply_rotary(k, positions, cfg.rope_theta, cfg.rope_scaling_params)
      if layer_cache is None:
        out = self._attend(q, k, v, causal=self.causal, segment_ids=segment_ids)
      else:
        ck = cache_lib.write(layer_cache[0], k, cache_ctx.lengths)
        cv = cache_lib.write(layer_cache[1], v, cache_ctx.lengths)
        new_cache = (ck, cv)
        if cache_ctx.prefill:  # the cache was empty: attend over the new tokens only
          out = self._attend(q, k, v, causal=self.causal, segment_ids=segment_ids)
        else:
          s = ck.shape[2]
          slot = cache_ctx.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
          end = (cache_ctx.lengths + cache_ctx.n_new)[:, None, None]
          j = jnp.arange(s)[None, None, :]
          mask = (j <= slot[:, :, None]) & (j < end)
          out = cached_attention(q, ck, cv, mask, jnp.max(end))
    o = Einsum((n, cfg.resolved_head_dim, cfg.model_dim), ("heads", "head_dim", "embed"),
               "BTNH,NHD->BTD", ("embed",) if cfg.use_bias else None, dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, name="out")(out)
    return o, new_cache
