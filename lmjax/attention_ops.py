"""Attention as a pure function: the reference every kernel is checked against.

Scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need") with grouped
kv heads (Ainslie et al., 2023, "GQA"). Shapes use the alphabet of `lmjax.layers`: q is
`[B, T, N, H]`, k and v are `[B, S, K, H]`, and query head n reads kv head `n // (N // K)`.

Every attention function the model can be given (this one, or the Pallas kernel in
`infer.flash_attention`) has the signature of `reference_attention`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmjax.layers import einsum_f32

Array = jax.Array


class SegmentIds(NamedTuple):
  """Segment ids of queries `[B, T]` and keys `[B, S]`; a token sees only its own segment."""

  q: Array
  kv: Array


def as_segment_ids(segment_ids, t: int, s: int) -> SegmentIds | None:
  """Normalizes `segment_ids` (None, a `[B, T]` array when T == S, or SegmentIds)."""
  if segment_ids is None or isinstance(segment_ids, SegmentIds):
    return segment_ids
  if t != s:
    raise ValueError(
        f"segment_ids as one array needs T == S (got T={t}, S={s}); pass "
        "SegmentIds(q=[B, T], kv=[B, S]) for attention across different lengths")
  return SegmentIds(segment_ids, segment_ids)


def check_shapes(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int, int]:
  """Checks q `[B, T, N, H]`, k and v `[B, S, K, H]`; returns (B, T, S, N, K, H)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be rank 4 ([B, T, N, H] and [B, S, K, H]); got q{q.shape}, "
        f"k{k.shape}, v{v.shape}")
  b, t, n, h = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{k.shape}, v{v.shape}")
  bk, s, kh, hk = k.shape
  if bk != b:
    raise ValueError(f"q and k disagree on batch: q{q.shape}, k{k.shape}")
  if hk != h:
    raise ValueError(f"q and k disagree on head dim H: q{q.shape}, k{k.shape}")
  if n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
  return b, t, s, n, kh, h


def attention_mask(
    b: int, t: int, s: int, *, causal: bool, segment_ids: SegmentIds | None,
    mask: Array | None = None,
) -> Array | None:
  """Boolean `[B, T, S]` mask (True = attend), or None when nothing is masked.

  Causal: query i sees key j iff j <= i + (S - T), so with T < S the queries are the newest T.
  """
  out = None
  if causal:
    qi = jnp.arange(t)[:, None] + (s - t)
    kj = jnp.arange(s)[None, :]
    out = jnp.broadcast_to(kj <= qi, (b, t, s))
  if segment_ids is not None:
    seg = segment_ids.q[:, :, None] == segment_ids.kv[:, None, :]
    out = seg if out is None else out & seg
  if mask is not None:
    out = mask if out is None else out & mask
  return out


def reference_attention(
    q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids=None,
    sm_scale: float | None = None, mask: Array | None = None, dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
  """Plain-jnp multi-head attention with GQA/MQA, causal and segment masks.

  Scores and softmax are computed in float32; rows with no visible key give zeros.

  Args:
    q: queries `[B, T, N, H]`.
    k: keys `[B, S, K, H]`, with N a multiple of K.
    v: values `[B, S, K, H]`.
    causal: query i sees key j iff j <= i + S - T.
    segment_ids: None, a `[B, T]` int array (needs T == S), or `SegmentIds(q, kv)`.
    sm_scale: score scale; default `1 / sqrt(H)`.
    mask: optional extra boolean `[B, T, S]` (True = attend). Kernels do not take it; the model
      passes it only on the decode-against-cache path.
    dropout_rate: dropout on the attention probabilities (training only; needs dropout_rng).
    dropout_rng: the PRNG key for that dropout.

  Returns:
    `[B, T, N, H]` in q's dtype.
  """
  b, t, s, n, kh, h = check_shapes(q, k, v)
  segment_ids = as_segment_ids(segment_ids, t, s)
  m = attention_mask(b, t, s, causal=causal, segment_ids=segment_ids, mask=mask)
  return grouped_attention(q, k, v, m, "BSKH", sm_scale=sm_scale, dropout_rate=dropout_rate,
                           dropout_rng=dropout_rng)


def grouped_attention(
    q: Array, k: Array, v: Array, mask: Array | None, kv_layout: str = "BSKH", *,
    sm_scale: float | None = None, dropout_rate: float = 0.0, dropout_rng: Array | None = None,
) -> Array:
  """softmax(q k^T * scale, masked) v with kv heads shared by groups of G = N // K query heads.

  Args:
    q: `[B, T, N, H]`.
    k, v: `[B, S, K, H]` (kv_layout "BSKH") or `[B, K, S, H]` ("BKSH", the KV cache's layout).
    mask: boolean `[B, T, S]` (True = attend) or None.

  Returns:
    `[B, T, N, H]` in q's dtype; rows with no visible key are zeros.
  """
  b, t, n, h = q.shape
  kh = k.shape[kv_layout.index("K")]
  g = n // kh
  scale = (1.0 / h**0.5) if sm_scale is None else sm_scale
  # Fold the G query heads of each kv head into the query axis: a plain batched matmul over
  # (B, K), which XLA lays out well (a 5-D "BTKGH" einsum ran 1.6x slower fwd+bwd on CPU).
  qf = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  if kv_layout == "BSKH":
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  elif kv_layout != "BKSH":
    raise ValueError(f"kv_layout must be 'BSKH' or 'BKSH', got {kv_layout!r}")
  scores = einsum_f32("BKQH,BKSH->BKQS", qf, k) * scale
  if mask is not None:
    fmask = jnp.tile(mask, (1, g, 1))[:, None]  # [B, 1, G*T, S], query index g * T + t
    scores = jnp.where(fmask, scores, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(scores, axis=-1)
  if mask is not None:  # a row that sees no key gives zeros, not a uniform average
    p = p * jnp.any(fmask, axis=-1, keepdims=True).astype(p.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  out = einsum_f32("BKQS,BKSH->BKQH", p.astype(v.dtype), v)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)

# Slots per part of a KV cache that `cached_attention` reads up to (a cache of S slots has
# min(MAX_PARTS, S // PART_SLOTS) parts).
PART_SLOTS = 128
MAX_PARTS = 8


def cached_attention(q: Array, k: Array, v: Array, mask: Array, used: Array) -> Array:
  """`grouped_attention` over a KV cache reading only its filled slots (to a part's end).

  A decode step attends over every slot of the cache `[B, K, S, H]`, filled or not, although
  slots at `used` and beyond are masked out: on a 2-core CPU one SmolLM2 step over 768 slots
  spent 1.8 ms in attention (35 MB of keys and values) against 0.35 ms over 256. On a CPU
  (1-16 new tokens, head dim a multiple of 16, no mesh) a hand-written kernel reads exactly the
  first `used` slots (`lmjax.quant.cpu_attention`: XLA's small ops cost ~45 us a layer, a
  SmolLM2 step 1.16-1.38x faster without them). Elsewhere the cache's S slots are cut into equal
  parts of at least `PART_SLOTS`, and `lax.switch` runs the attention over the smallest prefix
  of whole parts that holds every row's `used` slots: the masked slots left out contribute
  exact zeros, so the same attention up to summation order.

  Args:
    q: `[B, T, N, H]` queries.
    k, v: `[B, K, S, H]` the cache.
    mask: `[B, T, S]` boolean, False at every slot >= `used` (as well as where it says).
    used: `[]` int32, the slots any row reads: `max(lengths + new tokens)`.

  Returns:
    `[B, T, N, H]` as `grouped_attention(q, k, v, mask, "BKSH")`.
  """
  from lmjax.quant import cpu_attention  # (lmjax.quant imports the model's modules)
  return cpu_attention.attention(q, k, v, mask, used, _parts_attention)


def _parts_attention(q: Array, k: Array, v: Array, mask: Array, used: Array) -> Array:
  """`cached_attention` in XLA: the smallest prefix of whole parts holding `used` slots."""
  s = k.shape[2]
  parts = min(MAX_PARTS, s // PART_SLOTS)
  if parts <= 1:
    return grouped_attention(q, k, v, mask, "BKSH")
  size = -(-s // parts)
  ends = [min(s, size * (i + 1)) for i in range(parts)]

  def prefix(n):
    return lambda q, k, v, m: grouped_attention(q, k[:, :, :n], v[:, :, :n], m[..., :n], "BKSH")
  index = jnp.clip((used + size - 1) // size - 1, 0, parts - 1)
  return jax.lax.switch(index, [prefix(n) for n in ends], q, k, v, mask)


_ATTENTION_FNS: dict[str, object] = {"reference": reference_attention}


def register_attention(name: str, fn) -> None:
  """Makes `fn` (with `reference_attention`'s signature) selectable as `attention=name`."""
  _ATTENTION_FNS[name] = fn


def get_attention(name: str):
  """The attention function registered under `name`."""
  if name not in _ATTENTION_FNS:
    hint = (" (import infer.flash_attention to register it; train and infer do so when a "
            "config names it)" if name == "flash" else "")
    raise ValueError(
        f"attention={name!r} is not registered{hint}; registered: {sorted(_ATTENTION_FNS)}")
  return _ATTENTION_FNS[name]
