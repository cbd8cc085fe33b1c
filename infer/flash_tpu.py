"""Flash attention for TPU: Pallas kernels lowered by Mosaic TPU.

FlashAttention (Dao et al., 2022) and FlashAttention-2 (Dao, 2023) on the TPU's grid model: the
grid is (batch, head, query block, key block), the key-block axis is the innermost, sequential
("arbitrary") one, and the running max, running sum and output accumulator live in VMEM scratch
between its steps. Blocks come from HBM by BlockSpec index maps, so a kv head is read by each of
its N/K query heads through `head // groups` in the index map and never copied.

Causal skipping: a key block above the diagonal does no compute (`pl.when`), and its index map
repeats the last visible block's index so the pipeline issues no DMA for it.

Layout: the kernels see `[B, N, T, H]` (heads before sequence) so that a block's two minor
dimensions are (sequence block, head dim), the (8, 128)-tiled shape Mosaic wants; the wrapper
transposes. Per-row statistics are kept lane-replicated, `(block, 128)`, as Mosaic prefers.
On hardware, blocks must be multiples of 128 or the whole padded length.

All functions take padded arrays (see `flash_common.Plan`); `flash_attention.py` pads and slices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from infer import flash_common as fc

LANES = fc.LANES
SUBLANES = fc.SUBLANES
_NT = (((1,), (1,)), ((), ()))  # dot_general dims: contract the minor dims, a @ b.T.


def _lanes(x: jax.Array, n: int) -> jax.Array:
  """Widens a lane-replicated `(rows, 128)` statistic to `(rows, n)`."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _seg_lanes(ids: jax.Array, length: int) -> jax.Array:
  """`[B, L]` ids as `[B, L, 128]` (one id per row, replicated along lanes)."""
  return jax.lax.broadcast_in_dim(ids, (ids.shape[0], length, LANES), (0, 1))


def _seg_rows(ids: jax.Array, length: int) -> jax.Array:
  """`[B, L]` ids as `[B, 8, L]` (one id per lane, replicated along sublanes)."""
  return jax.lax.broadcast_in_dim(ids, (ids.shape[0], SUBLANES, length), (0, 2))


def _params(n_parallel: int, n_arbitrary: int) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _run_visible(step, i, j, bq: int, bk: int, plan: fc.Plan, has_seg: bool):
  """Runs `step(masked)` for a visible block: the masked variant only where the block needs it.

  Blocks above the causal diagonal run neither variant (the causal skip).
  """
  visible = fc.block_visible(i, j, bq, bk, plan)
  needs_mask = fc.block_needs_mask(i, j, bq, bk, plan, has_seg)
  if needs_mask is False:
    pl.when(visible)(lambda: step(False))
    return
  if needs_mask is True:
    pl.when(visible)(lambda: step(True))
    return
  pl.when(jnp.logical_and(visible, needs_mask))(lambda: step(True))
  pl.when(jnp.logical_and(visible, jnp.logical_not(needs_mask)))(lambda: step(False))


def _scores(q, k, masked: bool, i, j, plan: fc.Plan, seg_refs, has_seg: bool) -> jax.Array:
  """Scaled scores `(bq, bk)` of query block i and key block j, masked when `masked`."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * plan.scale
  if masked:
    (bq, bk), (qseg_ref, kvseg_ref) = s.shape, seg_refs
    seg = (_lanes(qseg_ref[...], bk), kvseg_ref[:1, :]) if has_seg else (None, None)
    mask = fc.make_mask(fc.iota(s.shape, 0, i * bq), fc.iota(s.shape, 1, j * bk), plan, *seg)
    s = jnp.where(mask, s, fc.NEG_INF)
  return s


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, plan: fc.Plan, has_seg: bool, save_lse: bool):
  (q_ref, k_ref, v_ref), (qseg_ref, kvseg_ref), refs = fc.split_refs(refs, 3, has_seg)
  o_ref = refs.pop(0)
  lse_ref = refs.pop(0) if save_lse else None
  m_scr, l_scr, acc_scr = refs
  bq, bk = plan.block_q, plan.block_k
  head_dim = q_ref.shape[-1]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, fc.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked: bool):
    s = _scores(q_ref[...], k_ref[...], masked, i, j, plan, (qseg_ref, kvseg_ref), has_seg)
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == fc.NEG_INF, 0.0, m_next)  # rows that saw nothing yet
    p = jnp.exp(s - _lanes(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + pv

  _run_visible(step, i, j, bq, bk, plan, has_seg)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))
    o_ref[...] = (acc_scr[...] * _lanes(inv, head_dim)).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = jnp.where(l == 0.0, jnp.inf, m_scr[...] + jnp.log(l))


def forward(q, k, v, seg, plan: fc.Plan, save_lse: bool):
  """Forward kernel on padded `[B, Tp, N, H]` / `[B, Sp, K, H]`; returns (o, lse `[B, N, Tp]`)."""
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  b, n, t_pad, h = qt.shape
  bq, bk, g = plan.block_q, plan.block_k, plan.groups
  grid = (b, n, t_pad // bq, plan.s_pad // bk)

  def kv_block(i, j):
    if not plan.causal:
      return j
    return jnp.minimum(j, jnp.maximum(fc.last_visible_kv_block(i, bq, bk, plan), 0))

  in_specs = [
      pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0)),
      pl.BlockSpec((None, None, bk, h), lambda b_, n_, i, j: (b_, n_ // g, kv_block(i, j), 0)),
      pl.BlockSpec((None, None, bk, h), lambda b_, n_, i, j: (b_, n_ // g, kv_block(i, j), 0)),
  ]
  args = [qt, kt, vt]
  if seg is not None:
    in_specs += [
        pl.BlockSpec((None, bq, LANES), lambda b_, n_, i, j: (b_, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), lambda b_, n_, i, j: (b_, 0, kv_block(i, j))),
    ]
    args += [_seg_lanes(seg[0], t_pad), _seg_rows(seg[1], plan.s_pad)]
  out_shape = [jax.ShapeDtypeStruct(qt.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0))]
  if save_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, n, t_pad, LANES), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq, LANES), lambda b_, n_, i, j: (b_, n_, i, 0)))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, has_seg=seg is not None, save_lse=save_lse),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[
          pltpu.VMEM((bq, LANES), jnp.float32),
          pltpu.VMEM((bq, LANES), jnp.float32),
          pltpu.VMEM((bq, h), jnp.float32),
      ],
      compiler_params=_params(3, 1),
      interpret=plan.interpret,
      name="lmjax_flash_fwd_tpu",
  )(*args)
  o = outs[0].transpose(0, 2, 1, 3)
  lse = outs[1][..., 0] if save_lse else None
  return o, lse


# ---------------------------------------------------------------------------------------------
# Backward: dq (grid over query blocks, reduce over key blocks).


def _dq_kernel(*refs, plan: fc.Plan, has_seg: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qseg_ref, kvseg_ref), refs = fc.split_refs(
      refs, 6, has_seg)
  dq_ref, acc_scr = refs
  bq, bk = plan.block_q_dq, plan.block_k_dq
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    s = _scores(q_ref[...], k, masked, i, j, plan, (qseg_ref, kvseg_ref), has_seg)
    lse = jnp.expand_dims(lse_ref[0], -1)  # (bq, 1)
    di = jnp.expand_dims(di_ref[0], -1)
    p = jnp.exp(s - lse)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di)
    acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _run_visible(step, i, j, bq, bk, plan, has_seg)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_scr[...] * plan.scale).astype(dq_ref.dtype)


# Backward: dk, dv (grid over key blocks, reduce over the group's query heads and query blocks).


def _dkv_kernel(*refs, plan: fc.Plan, has_seg: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (kvseg_ref, qseg_ref), refs = fc.split_refs(
      refs, 6, has_seg)
  dk_ref, dv_ref, dk_scr, dv_scr = refs
  bq, bk = plan.block_q_dkv, plan.block_k_dkv
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(g == 0, i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    # Everything in (key, query) orientation, so the per-query lse and delta are rows.
    s = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
    s = s * plan.scale
    if masked:
      shape = (bk, bq)
      seg = (qseg_ref[:1, :], _lanes(kvseg_ref[...], bq)) if has_seg else (None, None)
      mask = fc.make_mask(fc.iota(shape, 1, i * bq), fc.iota(shape, 0, j * bk), plan, *seg)
      s = jnp.where(mask, s, fc.NEG_INF)
    p = jnp.exp(s - lse_ref[...])  # (bk, bq) - (1, bq)
    dv_scr[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[...])
    dk_scr[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)

  _run_visible(step, i, j, bq, bk, plan, has_seg)

  @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, seg, lse, delta, do, plan: fc.Plan):
  """dq, dk, dv from padded inputs, the saved lse and delta = rowsum(dO * O) (`[B, N, Tp]`)."""
  qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
  b, n, t_pad, h = qt.shape
  kh, s_pad, g = kt.shape[1], plan.s_pad, plan.groups
  lse4, di4 = lse[:, :, None, :], delta[:, :, None, :]  # [B, N, 1, Tp]: lse as a lane row
  has_seg = seg is not None
  if has_seg:
    q_lanes, q_rows = _seg_lanes(seg[0], t_pad), _seg_rows(seg[0], t_pad)
    kv_lanes, kv_rows = _seg_lanes(seg[1], s_pad), _seg_rows(seg[1], s_pad)

  # dq.
  bq, bk = plan.block_q_dq, plan.block_k_dq

  def kv_block(i, j):
    if not plan.causal:
      return j
    return jnp.minimum(j, jnp.maximum(fc.last_visible_kv_block(i, bq, bk, plan), 0))

  q_spec = pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda b_, n_, i, j: (b_, n_ // g, kv_block(i, j), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j: (b_, n_, 0, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [qt, kt, vt, dot_, lse4, di4]
  if has_seg:
    in_specs += [
        pl.BlockSpec((None, bq, LANES), lambda b_, n_, i, j: (b_, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), lambda b_, n_, i, j: (b_, 0, kv_block(i, j))),
    ]
    args += [q_lanes, kv_rows]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, has_seg=has_seg),
      grid=(b, n, t_pad // bq, s_pad // bk),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=plan.interpret,
      name="lmjax_flash_dq_tpu",
  )(*args)

  # dk, dv.
  bq, bk = plan.block_q_dkv, plan.block_k_dkv

  def q_block(i, j):
    if not plan.causal:
      return i
    last = t_pad // bq - 1
    return jnp.minimum(jnp.maximum(i, fc.first_visible_q_block(j, bq, bk, plan)), last)

  q_spec = pl.BlockSpec(
      (None, None, bq, h), lambda b_, k_, j, g_, i: (b_, k_ * g + g_, q_block(i, j), 0))
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda b_, k_, j, g_, i: (b_, k_, j, 0))
  row_spec = pl.BlockSpec(
      (None, None, 1, bq), lambda b_, k_, j, g_, i: (b_, k_ * g + g_, 0, q_block(i, j)))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [qt, kt, vt, dot_, lse4, di4]
  if has_seg:
    in_specs += [
        pl.BlockSpec((None, bk, LANES), lambda b_, k_, j, g_, i: (b_, j, 0)),
        pl.BlockSpec((None, SUBLANES, bq), lambda b_, k_, j, g_, i: (b_, 0, q_block(i, j))),
    ]
    args += [kv_lanes, q_rows]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, has_seg=has_seg),
      grid=(b, kh, s_pad // bk, g, t_pad // bq),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
      compiler_params=_params(3, 2),
      interpret=plan.interpret,
      name="lmjax_flash_dkv_tpu",
  )(*args)
  return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
