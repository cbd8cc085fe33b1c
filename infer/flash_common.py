"""Pieces shared by the TPU and GPU flash-attention kernels.

The kernels follow FlashAttention (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient
Exact Attention with IO-Awareness") and FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"). This module holds what both backends
agree on: the static description of one call (`Plan`), the masks, and which key blocks a query
block can see under the causal rule.

Positions are those of the padded arrays; the true lengths `t` and `s` decide what is real. Query
i sees key j iff j <= i + (s - t) (causal), j < s (always), and the two share a segment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

LANES = 128  # TPU vector lane count (the minor dimension of a vreg).
SUBLANES = 8  # TPU vector sublane count.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one flash-attention call (hashable: a `custom_vjp` static arg).

  Attributes:
    backend: "tpu" or "gpu", the kernel family.
    interpret: False, True, or backend interpret params (run the kernel on the CPU).
    causal: whether the causal rule applies.
    scale: the score scale (`sm_scale`).
    t: true query length T.
    s: true key length S.
    t_pad: padded query length, a multiple of every query block.
    s_pad: padded key length, a multiple of every key block.
    groups: query heads per kv head (N // K).
    block_q, block_k: forward blocks.
    block_q_dkv, block_k_dkv: blocks of the dk/dv kernel.
    block_q_dq, block_k_dq: blocks of the dq kernel.
  """

  backend: str
  interpret: Any
  causal: bool
  scale: float
  t: int
  s: int
  t_pad: int
  s_pad: int
  groups: int
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int

  @property
  def offset(self) -> int:
    """S - T: query i sees keys j <= i + offset under the causal rule."""
    return self.s - self.t

  @property
  def kv_padded(self) -> bool:
    return self.s_pad != self.s


def last_visible_kv_block(q_block, block_q: int, block_k: int, plan: Plan):
  """Index of the last key block a query block can see (may be -1 when it sees none)."""
  last_row = (q_block + 1) * block_q - 1 + plan.offset
  return jnp.floor_divide(last_row, block_k)


def num_visible_kv_blocks(q_block, block_q: int, block_k: int, plan: Plan):
  """How many key blocks (from block 0) a query block visits: all, or up to the diagonal."""
  n = plan.s_pad // block_k
  if not plan.causal:
    return n
  return jnp.clip(last_visible_kv_block(q_block, block_q, block_k, plan) + 1, 0, n)


def first_visible_q_block(kv_block, block_q: int, block_k: int, plan: Plan):
  """Index of the first query block that sees a key block (0 when not causal)."""
  if not plan.causal:
    return 0
  first_row = jnp.maximum(kv_block * block_k - plan.offset, 0)
  return jnp.minimum(jnp.floor_divide(first_row, block_q), plan.t_pad // block_q)


def block_visible(q_block, kv_block, block_q: int, block_k: int, plan: Plan):
  """Whether any query of the block sees any key of the block (the causal skip test)."""
  if not plan.causal:
    return True
  return kv_block * block_k <= (q_block + 1) * block_q - 1 + plan.offset


def block_needs_mask(q_block, kv_block, block_q: int, block_k: int, plan: Plan, has_seg: bool):
  """Whether a (visible) block has any masked entry; unmasked blocks skip the mask arithmetic."""
  if has_seg:
    return True
  need = False
  if plan.causal:  # Some key of the block lies beyond the first query row's reach.
    need = (kv_block + 1) * block_k - 1 > q_block * block_q + plan.offset
  if plan.kv_padded:
    pad = (kv_block + 1) * block_k > plan.s
    need = pad if need is False else jnp.logical_or(need, pad)
  return need


def num_unmasked_kv_blocks(q_block, block_q: int, block_k: int, plan: Plan, has_seg: bool):
  """How many leading key blocks a query block sees whole (no mask needed); the rest are masked."""
  n = plan.s // block_k  # blocks free of padding
  if has_seg:
    return 0
  if not plan.causal:
    return n
  whole = jnp.floor_divide(q_block * block_q + plan.offset + 1, block_k)
  return jnp.clip(whole, 0, n)


def first_unmasked_q_block(kv_block, block_q: int, block_k: int, plan: Plan, has_seg: bool):
  """First query block from which on every query sees the whole key block (no mask needed)."""
  n_q = plan.t_pad // block_q
  if has_seg:
    return n_q
  first = 0
  if plan.causal:
    need = (kv_block + 1) * block_k - 1 - plan.offset  # first query row that sees it whole
    first = jnp.clip(-jnp.floor_divide(-need, block_q), 0, n_q)
  if plan.kv_padded:  # a block holding padding is masked for every query block
    # 1 iff the block holds padding. (Not `jnp.where`: the Triton lowering of a select between
    # two constants gives the wrong type in jax 0.10.2.)
    has_pad = jnp.clip((kv_block + 1) * block_k - plan.s, 0, 1)
    first = jnp.maximum(first, n_q * has_pad)
  return first


def make_mask(q_pos, k_pos, plan: Plan, q_seg=None, kv_seg=None):
  """Boolean mask (True = attend) from broadcastable query/key positions and segment ids.

  Args:
    q_pos: int32 query positions, broadcastable against `k_pos` (same rank).
    k_pos: int32 key positions.
    plan: the call's `Plan`.
    q_seg: optional query segment ids, same shape as the mask.
    kv_seg: optional key segment ids, broadcastable to the mask.

  Returns:
    A boolean array, or None when nothing is masked.
  """
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if plan.causal:
    mask = _and(mask, k_pos <= q_pos + plan.offset)
  if plan.kv_padded:
    mask = _and(mask, k_pos < plan.s)
  if q_seg is not None:
    mask = _and(mask, q_seg == kv_seg)
  return mask


def iota(shape, dim: int, start) -> jax.Array:
  """`start + broadcasted_iota(shape, dim)` as int32 (2-D iota: what Mosaic TPU accepts)."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim) + start


NEG_INF = float("-inf")


def split_refs(refs, n_inputs: int, has_seg: bool):
  """A kernel's refs -> (its first n_inputs, the two segment-id refs or Nones, the rest).

  Every kernel here takes its array inputs, then (when segment ids are given) two segment-id
  inputs, then its outputs and scratch buffers.
  """
  refs = list(refs)
  head, rest = refs[:n_inputs], refs[n_inputs:]
  if not has_seg:
    return head, (None, None), rest
  return head, (rest[0], rest[1]), rest[2:]
