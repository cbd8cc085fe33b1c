"""Transformer blocks, the encoder/decoder stack, and the three models (Vaswani et al., 2017).

`CausalLM` is decoder-only (GPT-2, Llama), `MaskedLM` encoder-only with a BERT prediction head
(Devlin et al., 2019), `Seq2SeqLM` the original encoder-decoder. Logits are float32 whatever
the compute dtype.

Limits (learned positions' `max_len`, a KV cache's slots): a call whose shapes pass one
raises; rows whose values pass one get NaN logits, or an error with `checks=True` / `checked`;
see `lmjax.limits`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.attention import CacheContext, MultiHeadAttention
from lmjax.cache import KVCache
from lmjax.config import TransformerConfig
from lmjax.embeddings import LearnedPositions, TokenEmbedding, sinusoidal
from lmjax.layers import Einsum, FeedForward, Norm, activation_fn, einsum_f32
from lmjax.limits import Limits, check_encoder_len
from lmjax.sharding import constrain

Array = jax.Array
ACT = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from_segments(segment_ids: Array) -> Array:
  """Per-segment positions `[B, T]` (restarting at 0 where the segment id changes)."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t)[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return (idx - start_idx).astype(jnp.int32)


class Block(nn.Module):
  """One layer: self-attention, cross-attention (decoder of Seq2SeqLM), feed-forward.

  Each sublayer is wrapped in Add & Norm: `x + f(norm(x))` (pre) or `norm(x + f(x))` (post).
  Call args are arrays only (`layer_cache` and `ctx` are dicts) so the block can be scanned
  and rematerialized; modes are attributes.
  """

  config: TransformerConfig
  causal: bool = False
  cross: bool = False
  train: bool = False
  prefill: bool = False
  use_cache: bool = False

  def _add_norm(self, x: Array, f, name: str) -> tuple[Array, Any]:
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate, name=f"{name}_dropout")
    if cfg.norm_placement == "pre":
      y, aux = f(Norm(cfg, name=f"{name}_norm")(x))
      return x + drop(y, deterministic=not self.train), aux
    y, aux = f(x)
    return Norm(cfg, name=f"{name}_norm")(x + drop(y, deterministic=not self.train)), aux

  @nn.compact
  def __call__(self, x: Array, layer_cache: dict, ctx: dict) -> tuple[Array, dict]:
    cfg = self.config
    cache_ctx = None
    if self.use_cache:
      cache_ctx = CacheContext(ctx["cache_lengths"], ctx["cache_n_new"], self.prefill)
    attn = MultiHeadAttention(cfg, causal=self.causal, train=self.train, name="self_attention")
    self_cache = (layer_cache["k"], layer_cache["v"]) if self.use_cache else None
    x, self_kv = self._add_norm(x, lambda h: attn(
        h, positions=ctx["positions"], segment_ids=ctx["segment_ids"], layer_cache=self_cache,
        cache_ctx=cache_ctx), "self_attention")
    new_cache = {}
    if self_kv is not None:
      new_cache["k"], new_cache["v"] = self_kv
    if self.cross:
      xattn = MultiHeadAttention(cfg, cross=True, train=self.train, name="cross_attention")
      cross_cache = (layer_cache["ck"], layer_cache["cv"]) if self.use_cache else None
      x, cross_kv = self._add_norm(x, lambda h: xattn(
          h, segment_ids=ctx["segment_ids"], encoder_out=ctx["encoder_out"],
          encoder_segment_ids=ctx["encoder_segment_ids"], layer_cache=cross_cache,
          cache_ctx=cache_ctx), "cross_attention")
      if self.use_cache:
        new_cache["ck"], new_cache["cv"] = cross_kv
    ffn = FeedForward(cfg, name="mlp")
    x, _ = self._add_norm(x, lambda h: (ffn(h, train=self.train), None), "mlp")
    return constrain(x, ACT), new_cache


class Stack(nn.Module):
  """Positions, embedding norm and dropout, then `num_layers` blocks (scanned or unrolled)."""

  config: TransformerConfig
  num_layers: int
  causal: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, ctx: dict, cache: dict | None = None, *,
               train: bool = False, prefill: bool = False) -> tuple[Array, dict | None]:
    cfg = self.config
    if cfg.position == "learned":
      x = x + LearnedPositions(cfg, name="positions")(positions)
    elif cfg.position == "sinusoidal":
      x = x + sinusoidal(positions, cfg.model_dim).astype(x.dtype)
    if cfg.embed_norm:
      x = Norm(cfg, name="embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    x = constrain(x, ACT)
    ctx = {**ctx, "positions": positions}
    use_cache = cache is not None
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    kw = dict(causal=self.causal, cross=self.cross, train=train, prefill=prefill,
              use_cache=use_cache)
    layer_cache = cache if use_cache else {}
    if use_cache and isinstance(layer_cache["k"], (tuple, list)) == cfg.scan_layers:
      raise ValueError("the KV cache's layer layout does not match scan_layers="
                       f"{cfg.scan_layers}; make it with lmjax.init_cache(config, ...) of this "
                       "model's config")
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = scanned(cfg, name="layers", **kw)(x, layer_cache, ctx)
    else:
      new_cache = {k: list(c) for k, c in layer_cache.items()}  # one array per layer
      for i in range(self.num_layers):
        li = {k: c[i] for k, c in new_cache.items()}
        x, nc = block(cfg, name=f"layers_{i}", **kw)(x, li, ctx)
        for k, c in nc.items():
          new_cache[k][i] = c
      new_cache = {k: tuple(c) for k, c in new_cache.items()}
    if cfg.norm_placement == "pre":
      x = Norm(cfg, name="final_norm")(x)
    return x, (new_cache if use_cache else None)


class LMHead(nn.Module):
  """Output projection to float32 logits `[B, T, V]`: the tied embedding or its own weight."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, embed: TokenEmbedding) -> Array:
    cfg = self.config
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = self.param("kernel", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed", "vocab")), (cfg.model_dim, cfg.vocab_size),
          jnp.dtype(cfg.param_dtype))
      logits = einsum_f32("BTD,DV->BTV", x, w.astype(x.dtype))
    return constrain(logits.astype(jnp.float32),
                     ("activation_batch", "activation_length", "activation_vocab"))


def _check_tokens(tokens: Array, name: str) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"{name} must be [B, T] token ids, got shape {tokens.shape}")


def _new_tokens(segment_ids: Array | None, tokens: Array) -> Array:
  if segment_ids is None:
    return jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
  return jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)


def _positions(positions, segment_ids, tokens, cache: KVCache | None) -> Array:
  if positions is not None:
    return positions
  t = tokens.shape[1]
  if cache is not None:
    return cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  if segment_ids is not None:
    return positions_from_segments(segment_ids)
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)


def _inputs(cfg: TransformerConfig, limits: Limits, name: str, tokens: Array, positions,
            segment_ids, cache: KVCache | None = None) -> tuple[Array, dict]:
  """`[B, T]` tokens' positions and the blocks' cache ctx, checked against the limits: shapes
  that pass one raise, values that do flag their rows in `limits`."""
  _check_tokens(tokens, name)
  derived = positions is None and segment_ids is None  # 0..T-1, or the cache's next T, all real
  limits.shapes(cfg, name, tokens.shape[1], derived, cache)
  ctx, n_new = {}, None
  if cache is not None:
    n_new = _new_tokens(segment_ids, tokens)
    ctx = {"cache_lengths": cache.lengths, "cache_n_new": n_new}
  pos = _positions(positions, segment_ids, tokens, cache)
  limits.values(cfg, name, pos, segment_ids, tokens.shape, derived, cache, n_new)
  return pos, ctx


def _one_stack(model: str, cfg: TransformerConfig, tokens: Array, positions, segment_ids,
               cache: KVCache | None, checks: bool) -> tuple[Array, dict, Limits]:
  """The start `CausalLM` and `MaskedLM` share: the config's family, the inputs' limits, ctx."""
  has, lacks = ("decoder", "encoder") if model == "CausalLM" else ("encoder", "decoder")
  if getattr(cfg, f"num_{has}_layers") == 0 or getattr(cfg, f"num_{lacks}_layers"):
    raise ValueError(f"{model} needs num_{has}_layers > 0 and num_{lacks}_layers == 0")
  limits = Limits(checks)
  pos, ctx = _inputs(cfg, limits, "tokens", tokens, positions, segment_ids, cache)
  ctx.update(segment_ids=segment_ids, encoder_out=None, encoder_segment_ids=None)
  return pos, ctx, limits


class CausalLM(nn.Module):
  """Decoder-only language model: next-token logits `[B, T, V]` (float32)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, cache: KVCache | None = None,
               prefill: bool = False, train: bool = False, checks: bool = False):
    """Args:
      tokens: `[B, T]` int ids.
      positions: `[B, T]`; default restarts per segment, or continues each row's cache.
      segment_ids: `[B, T]`, 0 = padding (right-padded); tokens see only their own segment.
      cache: a `KVCache`; new keys/values go at each row's own length.
      prefill: the cache is empty; attend over the new tokens only (lets a kernel run).
      train: dropout on.
      checks: report rows past a limit with `checkify.check` (see `lmjax.limits.checked`).

    Returns:
      logits `[B, T, V]`, or `(logits, cache)` when a cache is given; NaN in every row that
      passes a limit (a learned position >= `max_len`, a write past the cache's last slot).

    Raises:
      ValueError: when the shapes alone pass a limit (see `lmjax.limits`).
    """
    cfg = self.config
    pos, ctx, limits = _one_stack("CausalLM", cfg, tokens, positions, segment_ids, cache, checks)
    embed = TokenEmbedding(cfg, name="embed")
    layer_cache = None if cache is None else {"k": cache.k, "v": cache.v}
    x, new = Stack(cfg, cfg.num_decoder_layers, causal=True, name="decoder")(
        embed(tokens), pos, ctx, layer_cache, train=train, prefill=prefill)
    logits = limits.guard(LMHead(cfg, name="lm_head")(x, embed))
    if cache is None:
      return logits
    return logits, cache.replace(k=new["k"], v=new["v"],
                                 lengths=cache.lengths + ctx["cache_n_new"])


class MaskedLM(nn.Module):
  """Encoder-only model with a BERT-style prediction head: logits `[B, T, V]` (float32)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, train: bool = False,
               checks: bool = False) -> Array:
    """Args: tokens, positions, segment_ids `[B, T]` (0 = padding), train, checks as in `CausalLM`.

    Returns: logits `[B, T, V]`, NaN in the rows whose learned positions pass `max_len`.
    """
    cfg = self.config
    pos, ctx, limits = _one_stack("MaskedLM", cfg, tokens, positions, segment_ids, None, checks)
    embed = TokenEmbedding(cfg, name="embed")
    x, _ = Stack(cfg, cfg.num_encoder_layers, name="encoder")(embed(tokens), pos, ctx,
                                                              train=train)
    d = cfg.model_dim
    h = Einsum((d, d), ("embed", "mlp"), "BTD,DF->BTF", ("mlp",), dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, name="head_transform")(x)
    act = "gelu" if cfg.gated else cfg.activation
    h = Norm(cfg, name="head_norm")(activation_fn(act)(h))
    bias = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                ("vocab",)), (cfg.vocab_size,),
                      jnp.dtype(cfg.param_dtype))
    return limits.guard(LMHead(cfg, name="lm_head")(h, embed)
                        + bias.astype(jnp.float32)[None, None, :])


class Seq2SeqLM(nn.Module):
  """Encoder-decoder model (the original transformer): decoder logits `[B, T, V]` (float32)."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.num_decoder_layers == 0 or cfg.num_encoder_layers == 0:
      raise ValueError("Seq2SeqLM needs num_encoder_layers > 0 and num_decoder_layers > 0")
    self.embed = TokenEmbedding(cfg)
    self.encoder = Stack(cfg, cfg.num_encoder_layers)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True, cross=True)
    self.lm_head = LMHead(cfg)

  def encode(self, encoder_tokens: Array, *, encoder_positions: Array | None = None,
             encoder_segment_ids: Array | None = None, train: bool = False,
             checks: bool = False) -> Array:
    """Encoder output `[B, Se, D]` of `[B, Se]` ids (0 segment = padding); NaN in the rows whose
    learned positions pass `max_len` (so a cache filled from it keeps those rows NaN)."""
    limits = Limits(checks)
    return self._encode(encoder_tokens, encoder_positions, encoder_segment_ids, train, limits)

  def _encode(self, encoder_tokens, encoder_positions, encoder_segment_ids, train,
              limits: Limits) -> Array:
    pos, _ = _inputs(self.config, limits, "encoder_tokens", encoder_tokens, encoder_positions,
                     encoder_segment_ids)
    ctx = {"segment_ids": encoder_segment_ids, "encoder_out": None,
           "encoder_segment_ids": None}
    x, _ = self.encoder(self.embed(encoder_tokens), pos, ctx, train=train)
    return limits.guard(x)  # only the encoder's flags are in `limits` yet

  def __call__(self, encoder_tokens: Array | None, decoder_tokens: Array, *,
               encoder_positions: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_segment_ids: Array | None = None, cache: KVCache | None = None,
               prefill: bool = False, train: bool = False, checks: bool = False):
    """Args:
      encoder_tokens: `[B, Se]` ids; None when the cache already holds the encoder's keys.
      decoder_tokens: `[B, T]` ids (shifted right, starting from a start token).
      encoder_/decoder_positions, _segment_ids: as in `CausalLM` (0 = padding).
      cache: a `KVCache` made with `init_cache(..., encoder_len=Se)`.
      prefill, train, checks: as in `CausalLM`.

    Returns:
      logits `[B, T, V]`, or `(logits, cache)` when a cache is given; NaN in every row that
      passes a limit, in the encoder or the decoder.
    """
    _check_tokens(decoder_tokens, "decoder_tokens")
    limits = Limits(checks)
    enc = None
    if encoder_tokens is not None:
      _check_tokens(encoder_tokens, "encoder_tokens")
      check_encoder_len(encoder_tokens.shape[1], cache)
      enc = self._encode(encoder_tokens, encoder_positions, encoder_segment_ids, train, limits)
      if encoder_segment_ids is None:
        encoder_segment_ids = jnp.ones(encoder_tokens.shape, jnp.int32)
    elif cache is None:
      raise ValueError("Seq2SeqLM needs encoder_tokens unless a filled cache is given")
    else:
      encoder_segment_ids = cache.cross_segment_ids
    pos, ctx = _inputs(self.config, limits, "decoder_tokens", decoder_tokens, decoder_positions,
                       decoder_segment_ids, cache)
    ctx.update(segment_ids=decoder_segment_ids, encoder_out=enc,
               encoder_segment_ids=encoder_segment_ids)
    layer_cache = None
    if cache is not None:
      layer_cache = {"k": cache.k, "v": cache.v, "ck": cache.cross_k, "cv": cache.cross_v}
    x, new = self.decoder(self.embed(decoder_tokens), pos, ctx, layer_cache, train=train,
                          prefill=prefill)
    logits = limits.guard(self.lm_head(x, self.embed))
    if cache is None:
      return logits
    return logits, cache.replace(
        k=new["k"], v=new["v"], cross_k=new["ck"], cross_v=new["cv"],
        cross_segment_ids=encoder_segment_ids.astype(jnp.int32),
        lengths=cache.lengths + ctx["cache_n_new"])
