"""Flash attention for NVIDIA (and ROCm) GPUs: Pallas kernels lowered through Triton.

FlashAttention (Dao et al., 2022) with the FlashAttention-2 work split (Dao, 2023): one program
per (query block, batch, head) loops over key blocks with the online softmax; the backward runs
one program per (key block, batch, kv head) for dk/dv and one per query block for dq, both
recomputing the probabilities from the saved log-sum-exp.

Why the Triton lowering and not Mosaic GPU. JAX now steers new GPU kernels to Mosaic GPU and calls
`pl.pallas_call` with Mosaic GPU deprecated, but Mosaic GPU targets Hopper and newer only and
expects warpgroup-level programming (TMA copies, barriers, `wgmma` layouts, a different kernel per
generation). The Triton lowering still compiles plain grid + BlockSpec kernels like these on Ampere,
Ada and Hopper alike, and its semantics match what the interpreter runs on the CPU in tests. We
select it explicitly by passing `pallas.triton.CompilerParams`, so the choice does not depend on
the `jax_pallas_use_mosaic_gpu` flag. A Hopper-only Mosaic GPU kernel can be added beside this one.

Layout: the kernels read `[B, T, N, H]` in place (squeezed batch and head dims in the BlockSpecs);
a kv head is read through `head // groups` in the index map, never copied. Triton needs every
loaded tile to have a power-of-two size, so blocks are powers of two and the wrapper zero-pads
the head dim to one. The key loop stops at the diagonal under the causal rule (blocks above it
are never visited). Inputs are padded (see `flash_common.Plan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from infer import flash_common as fc

_NT = (((1,), (1,)), ((), ()))  # dot_general dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # dot_general dims: a.T @ b


def _params(head_dim: int, block_q: int, block_k: int) -> pltriton.CompilerParams:
  big = head_dim > 64 or block_q * block_k > 64 * 64
  return pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=2)


def _scores(q, k, q0, k0, plan: fc.Plan, masked: bool, q_seg=None, kv_seg=None):
  """Scaled scores `(bq, bk)` (f32) of a query tile against a key tile, masked if `masked`."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * plan.scale
  if not masked:
    return s
  q_pos = q0 + jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
  k_pos = k0 + jnp.arange(k.shape[0], dtype=jnp.int32)[None, :]
  seg = (None, None) if q_seg is None else (q_seg[:, None], kv_seg[None, :])
  mask = fc.make_mask(q_pos, k_pos, plan, *seg)
  return s if mask is None else jnp.where(mask, s, fc.NEG_INF)


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, plan: fc.Plan, has_seg: bool, save_lse: bool):
  (q_ref, k_ref, v_ref), (qseg_ref, kvseg_ref), refs = fc.split_refs(refs, 3, has_seg)
  o_ref = refs.pop(0)
  lse_ref = refs.pop(0) if save_lse else None
  bq, bk = plan.block_q, plan.block_k
  i = pl.program_id(0)
  q = q_ref[...]
  q_seg = qseg_ref[...] if has_seg else None

  def body(j, carry, masked):
    acc, m_prev, l_prev = carry
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kv_seg = kvseg_ref[ks] if has_seg else None
    s = _scores(q, k_ref[ks, :], i * bq, j * bk, plan, masked, q_seg, kv_seg)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == fc.NEG_INF, 0.0, m_next)  # rows that saw nothing yet
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m_prev - m_safe)
    v = v_ref[ks, :]
    pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_next, alpha * l_prev + jnp.sum(p, axis=1)

  init = (
      jnp.zeros(q.shape, jnp.float32),
      jnp.full((bq,), fc.NEG_INF, jnp.float32),
      jnp.zeros((bq,), jnp.float32),
  )
  n_whole = fc.num_unmasked_kv_blocks(i, bq, bk, plan, has_seg)
  carry = jax.lax.fori_loop(0, n_whole, functools.partial(body, masked=False), init)
  n_visible = fc.num_visible_kv_blocks(i, bq, bk, plan)
  acc, m, l = jax.lax.fori_loop(n_whole, n_visible, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  if lse_ref is not None:
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


def forward(q, k, v, seg, plan: fc.Plan, save_lse: bool):
  """Forward kernel on padded `[B, Tp, N, H]` / `[B, Sp, K, H]`; returns (o, lse `[B, N, Tp]`)."""
  b, t_pad, n, h = q.shape
  bq, bk, g = plan.block_q, plan.block_k, plan.groups
  in_specs = [
      pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0)),
      pl.BlockSpec((None, plan.s_pad, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0)),
      pl.BlockSpec((None, plan.s_pad, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0)),
  ]
  args = [q, k, v]
  if seg is not None:
    in_specs += [
        pl.BlockSpec((None, bq), lambda i, b_, n_: (b_, i)),
        pl.BlockSpec((None, plan.s_pad), lambda i, b_, n_: (b_, 0)),
    ]
    args += list(seg)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0))]
  if save_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, n, t_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq), lambda i, b_, n_: (b_, n_, i)))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, has_seg=seg is not None, save_lse=save_lse),
      grid=(t_pad // bq, b, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(h, bq, bk),
      interpret=plan.interpret,
      name="lmjax_flash_fwd_gpu",
  )(*args)
  return outs[0], (outs[1] if save_lse else None)


# ---------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(*refs, plan: fc.Plan, has_seg: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qseg_ref, kvseg_ref), refs = fc.split_refs(
      refs, 6, has_seg)
  (dq_ref,) = refs
  bq, bk = plan.block_q_dq, plan.block_k_dq
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]
  q_seg = qseg_ref[...] if has_seg else None

  def body(j, acc, masked):
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kv_seg = kvseg_ref[ks] if has_seg else None
    k = k_ref[ks, :]
    p = jnp.exp(_scores(q, k, i * bq, j * bk, plan, masked, q_seg, kv_seg) - lse)
    dp = jax.lax.dot_general(do, v_ref[ks, :], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di)
    return acc + jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  n_whole = fc.num_unmasked_kv_blocks(i, bq, bk, plan, has_seg)
  acc = jnp.zeros(q.shape, jnp.float32)
  acc = jax.lax.fori_loop(0, n_whole, functools.partial(body, masked=False), acc)
  n_visible = fc.num_visible_kv_blocks(i, bq, bk, plan)
  acc = jax.lax.fori_loop(n_whole, n_visible, functools.partial(body, masked=True), acc)
  dq_ref[...] = (acc * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, plan: fc.Plan, has_seg: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qseg_ref, kvseg_ref), refs = fc.split_refs(
      refs, 6, has_seg)
  dk_ref, dv_ref = refs
  bq, bk = plan.block_q_dkv, plan.block_k_dkv
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  kv_seg = kvseg_ref[...] if has_seg else None
  n_q = plan.t_pad // bq
  first = fc.first_visible_q_block(j, bq, bk, plan)  # query blocks before it see nothing
  whole = jnp.maximum(fc.first_unmasked_q_block(j, bq, bk, plan, has_seg), first)

  def body(i, carry, g, masked):
    dk, dv = carry
    qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[qs, g, :], do_ref[qs, g, :]
    lse, di = lse_ref[g, qs][:, None], di_ref[g, qs][:, None]
    q_seg = qseg_ref[qs] if has_seg else None
    p = jnp.exp(_scores(q, k, i * bq, j * bk, plan, masked, q_seg, kv_seg) - lse)  # (bq, bk)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                  preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di)
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
    return dk, dv

  def head(g, carry):  # the group's query heads share this kv head: sum their contributions
    carry = jax.lax.fori_loop(first, whole, functools.partial(body, g=g, masked=True), carry)
    return jax.lax.fori_loop(whole, n_q, functools.partial(body, g=g, masked=False), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, plan.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, seg, lse, delta, do, plan: fc.Plan):
  """dq, dk, dv from padded inputs, the saved lse and delta = rowsum(dO * O) (`[B, N, Tp]`)."""
  b, t_pad, n, h = q.shape
  kh, s_pad, g = k.shape[2], plan.s_pad, plan.groups
  has_seg = seg is not None

  bq, bk = plan.block_q_dq, plan.block_k_dq
  q_spec = pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0))
  kv_spec = pl.BlockSpec((None, s_pad, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b_, n_: (b_, n_, i))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b_, n_: (b_, i)),
                 pl.BlockSpec((None, s_pad), lambda i, b_, n_: (b_, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, has_seg=has_seg),
      grid=(t_pad // bq, b, n),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(h, bq, bk),
      interpret=plan.interpret,
      name="lmjax_flash_dq_gpu",
  )(q, k, v, do, lse, delta, *(seg or ()))

  bq, bk = plan.block_q_dkv, plan.block_k_dkv
  # All of a kv head's query heads in one block: the kernel sums their contributions.
  q_spec = pl.BlockSpec((None, t_pad, g, h), lambda j, b_, k_: (b_, 0, k_, 0))
  kv_spec = pl.BlockSpec((None, bk, None, h), lambda j, b_, k_: (b_, j, k_, 0))
  row_spec = pl.BlockSpec((None, g, t_pad), lambda j, b_, k_: (b_, k_, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if has_seg:
    in_specs += [pl.BlockSpec((None, t_pad), lambda j, b_, k_: (b_, 0)),
                 pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, has_seg=has_seg),
      grid=(s_pad // bk, b, kh),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(h, bq, bk),
      interpret=plan.interpret,
      name="lmjax_flash_dkv_gpu",
  )(q, k, v, do, lse, delta, *(seg or ()))
  return dq, dk, dv
