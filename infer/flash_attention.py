"""Flash attention: a Pallas kernel (TPU and GPU), forward and backward, beside a jnp reference.

Exact softmax attention computed tile by tile with the online-softmax recurrence of FlashAttention
(Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"),
with the loop order and work split of FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"): the forward keeps a query block on chip
and streams key/value blocks past it, saving only the per-row log-sum-exp; the backward
(`jax.custom_vjp`) recomputes the probabilities from that log-sum-exp in a dq kernel and a dk/dv
kernel, so no T x S matrix is ever stored.

`flash_attention` has the signature of `lmjax.attention_ops.reference_attention` (minus `mask`),
so it is itself the attention function the model takes by injection. The reference is re-exported
here as `reference_attention`; tests compare the kernels against it. Importing this module
registers it as `attention="flash"` for `lmjax.TransformerConfig`.

Backends: `flash_tpu` (Mosaic TPU) and `flash_gpu` (the Triton lowering; its docstring says why
not Mosaic GPU). The platform picks one; on the CPU, the reference runs unless `interpret=True`
asks for a kernel to run in the Pallas interpreter (`backend=` picks which), or the call is
traced inside `interpret_on_cpu()` (the trainer does this, so a CPU run trains through the
kernel it would run on a TPU or GPU).

The model reaches the kernel through `mesh_flash_attention`, registered as `attention="flash"`:
under a mesh (`jax.set_mesh`) it runs the kernel on each device's block of the batch and heads
in a `shard_map`, because XLA cannot partition a Pallas call by itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from infer import flash_common, flash_gpu, flash_tpu
from infer.requests import round_up as _round_up
from lmjax import sharding
from lmjax.attention_ops import (
    SegmentIds,
    as_segment_ids,
    check_shapes,
    reference_attention,
    register_attention,
)
from lmjax.sharding import LOGICAL_RULES

__all__ = ["BlockSizes", "SegmentIds", "flash_attention", "interpret_on_cpu",
           "mesh_flash_attention", "reference_attention"]

Array = jax.Array
_BACKENDS = {"tpu": flash_tpu, "gpu": flash_gpu}
_DTYPES = {"tpu": ("float32", "bfloat16"), "gpu": ("float32", "bfloat16", "float16")}
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (sequence positions per block); None takes the backend's default.

  Blocks larger than the (padded) sequence shrink to it. On the GPU every block must be a power
  of two (Triton tiles); on TPU hardware a multiple of 128 or the whole padded length.

  Attributes:
    block_q, block_k: forward query and key blocks.
    block_q_dkv, block_k_dkv: query and key blocks of the dk/dv kernel.
    block_q_dq, block_k_dq: query and key blocks of the dq kernel.
  """

  block_q: int | None = None
  block_k: int | None = None
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None
  block_q_dq: int | None = None
  block_k_dq: int | None = None

  @classmethod
  def uniform(cls, size: int) -> BlockSizes:
    """The same block everywhere (handy in tests: `BlockSizes.uniform(16)`)."""
    return cls(size, size, size, size, size, size)


# Untuned starting points (no hardware measurement yet; see benchmarks/flash_attention.py).
_DEFAULT_BLOCKS = {
    "tpu": BlockSizes(512, 512, 256, 512, 512, 256),
    "gpu": BlockSizes(128, 64, 64, 64, 64, 64),
}


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _fit_blocks(blocks: list[int], length: int) -> tuple[list[int], int]:
  """Shrinks blocks to the sequence and returns them with the padded length they all divide."""
  cap = _next_pow2(max(length, 16))
  blocks = [min(b, cap) for b in blocks]
  return blocks, _round_up(length, math.lcm(*blocks))


# True inside `interpret_on_cpu()`: `interpret=None` on a CPU then interprets the kernel.
_INTERPRET_ON_CPU = contextvars.ContextVar("lmjax_flash_interpret_on_cpu", default=False)


@contextlib.contextmanager
def interpret_on_cpu():
  """Within it, `flash_attention(..., interpret=None)` traced on a CPU runs the kernel in the
  Pallas interpreter instead of falling back to the reference (no effect on a TPU or GPU, where
  the compiled kernel runs anyway).

  The trainer opens it around everything it traces when a config names `attention="flash"`, so
  a CPU run trains through the kernel a TPU or GPU run compiles (slowly: the interpreter runs
  the kernel's block loops as XLA loops). The choice is made while tracing: a function already
  jitted outside the context keeps the attention it was traced with.
  """
  token = _INTERPRET_ON_CPU.set(True)
  try:
    yield
  finally:
    _INTERPRET_ON_CPU.reset(token)


def _resolve_backend(backend: str | None, interpret) -> tuple[str, object]:
  """Returns (kernel family or "reference", interpret value for pallas_call)."""
  if backend is not None and backend not in ("tpu", "gpu", "reference"):
    raise ValueError(f"backend must be None, 'tpu', 'gpu' or 'reference'; got {backend!r}")
  if backend == "reference":
    return "reference", False
  platform = jax.default_backend()
  on_device = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform)
  if interpret is None:
    if on_device is None and not _INTERPRET_ON_CPU.get():
      return "reference", False  # A CPU user gets the plain-jnp attention.
    interpret = on_device is None
  if not interpret:
    if on_device is None:
      raise ValueError(
          f"interpret=False needs a TPU or GPU, but the default backend is {platform!r}; pass "
          "interpret=True to run the kernel in the Pallas interpreter, or leave it None")
    if backend is not None and backend != on_device:
      raise ValueError(
          f"backend={backend!r} cannot be compiled on {platform!r}; pass interpret=True to "
          "interpret it")
    return on_device, False
  kind = backend or on_device or "tpu"
  if interpret is not True and kind != "tpu":
    raise ValueError(f"interpret={interpret!r} is for the TPU kernel; pass interpret=True for the "
                     f"{kind} kernel")
  return kind, interpret


def _check_inputs(q, k, v, segment_ids, sm_scale, kind: str):
  b, t, s, n, kh, h = check_shapes(q, k, v)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(
        f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
  allowed = _DTYPES.get(kind, ("float32", "bfloat16", "float16"))
  if jnp.dtype(q.dtype).name not in allowed:
    raise ValueError(f"q dtype {q.dtype} is not supported by the {kind} kernel; use one of "
                     f"{', '.join(allowed)}")
  if not 8 <= h <= _MAX_HEAD_DIM or h % 8:
    raise ValueError(
        f"head dim H={h} (last axis of q, k, v) is not supported: it must be a multiple of 8 "
        f"between 8 and {_MAX_HEAD_DIM}")
  if min(t, s) == 0:
    raise ValueError(f"q and k need at least one position; got T={t}, S={s}")
  if sm_scale is not None and not isinstance(sm_scale, numbers.Real):
    raise ValueError(f"sm_scale must be a Python number (static); got {type(sm_scale)}")
  seg = as_segment_ids(segment_ids, t, s)
  if seg is not None:
    for name, ids, length in (("segment_ids.q", seg.q, t), ("segment_ids.kv", seg.kv, s)):
      if ids.shape != (b, length):
        raise ValueError(f"{name} must have shape {(b, length)}; got {ids.shape}")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers; got {ids.dtype}")
  return (b, t, s, n, kh, h), seg


def _make_plan(kind, interpret, causal, scale, t, s, n, kh, block_sizes) -> flash_common.Plan:
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes or None; got {type(block_sizes)}")
  default = _DEFAULT_BLOCKS[kind]
  sizes = {}
  for f in dataclasses.fields(BlockSizes):
    size = getattr(block_sizes, f.name)
    sizes[f.name] = getattr(default, f.name) if size is None else size
  for name, size in sizes.items():
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"block_sizes.{name} must be a positive int; got {size!r}")
    if kind == "gpu" and (size < 16 or size & (size - 1)):
      raise ValueError(f"block_sizes.{name}={size}: GPU blocks must be powers of two >= 16")
  (bq, bqk, bqd), t_pad = _fit_blocks(
      [sizes["block_q"], sizes["block_q_dkv"], sizes["block_q_dq"]], t)
  (bk, bkk, bkd), s_pad = _fit_blocks(
      [sizes["block_k"], sizes["block_k_dkv"], sizes["block_k_dq"]], s)
  if kind == "tpu" and not interpret:
    for name, size, full in (("block_q", bq, t_pad), ("block_q_dkv", bqk, t_pad),
                             ("block_q_dq", bqd, t_pad), ("block_k", bk, s_pad),
                             ("block_k_dkv", bkk, s_pad), ("block_k_dq", bkd, s_pad)):
      if size % flash_common.LANES and size != full:
        raise ValueError(f"block_sizes.{name}={size}: TPU blocks must be multiples of 128 "
                         "(or cover the whole sequence)")
  return flash_common.Plan(
      backend=kind, interpret=interpret, causal=bool(causal), scale=float(scale), t=t, s=s,
      t_pad=t_pad, s_pad=s_pad, groups=n // kh, block_q=bq, block_k=bk, block_q_dkv=bqk,
      block_k_dkv=bkk, block_q_dq=bqd, block_k_dq=bkd)


def flash_attention(
    q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids=None,
    sm_scale: float | None = None, block_sizes: BlockSizes | None = None, interpret=None,
    backend: str | None = None,
) -> Array:
  """Multi-head attention (MHA, GQA, MQA) by a tiled Pallas kernel; differentiable.

  Same contract as `reference_attention`: softmax over keys in float32, rows with no visible key
  give zeros (and zero gradients). Lengths need not be multiples of the blocks: the wrapper pads
  and the kernels mask the padding.

  Args:
    q: queries `[B, T, N, H]`, float32 or bfloat16 (also float16 on GPU).
    k: keys `[B, S, K, H]`, same dtype; N must be a multiple of K (query head n reads kv head
      `n // (N // K)`). H a multiple of 8, at most 256.
    v: values `[B, S, K, H]`.
    causal: query i sees key j iff j <= i + S - T (with T < S the queries are the newest T, as in
      prefill against a cache). Key blocks above the diagonal are skipped, not only masked.
    segment_ids: None, a `[B, T]` int array (needs T == S) or `SegmentIds(q=[B, T], kv=[B, S])`;
      a query sees only keys of its own segment (packed sequences).
    sm_scale: score scale, a Python number; default `1 / sqrt(H)`.
    block_sizes: `BlockSizes` tiles; None uses the backend's defaults.
    interpret: None (kernel on TPU/GPU; on a CPU the reference, or the interpreted kernel inside
      `interpret_on_cpu()`), False (kernel; needs a TPU or GPU),
      True (run the kernel in the generic Pallas interpreter, on any platform), or
      `pallas.tpu.InterpretParams()` (the TPU kernel in the TPU-faithful interpreter, which also
      poisons uninitialized scratch and checks out-of-bounds reads).
    backend: None (from the platform), "tpu" or "gpu" (which kernel; other than the platform's
      only with `interpret`), or "reference".

  Returns:
    `[B, T, N, H]` in q's dtype.

  Raises:
    ValueError: shapes that disagree, N not a multiple of K, unsupported dtype or head dim,
      malformed segment ids or block sizes, or a kernel that cannot run on this platform.
  """
  kind, interp = _resolve_backend(backend, interpret)
  (b, t, s, n, kh, h), seg = _check_inputs(q, k, v, segment_ids, sm_scale, kind)
  if kind == "reference":
    return reference_attention(q, k, v, causal=causal, segment_ids=seg, sm_scale=sm_scale)
  scale = (1.0 / h**0.5) if sm_scale is None else sm_scale
  plan = _make_plan(kind, interp, causal, scale, t, s, n, kh, block_sizes)
  h_pad = max(16, _next_pow2(h)) if kind == "gpu" else h  # Triton: power-of-two tiles, K >= 16

  def pad(x, length, to):
    return jnp.pad(x, [(0, 0), (0, to - length), (0, 0), (0, h_pad - h)])

  qp, kp, vp = pad(q, t, plan.t_pad), pad(k, s, plan.s_pad), pad(v, s, plan.s_pad)
  seg_p = None
  if seg is not None:
    seg_p = (jnp.pad(seg.q.astype(jnp.int32), [(0, 0), (0, plan.t_pad - t)]),
             jnp.pad(seg.kv.astype(jnp.int32), [(0, 0), (0, plan.s_pad - s)]))
  out = _flash(qp, kp, vp, seg_p, plan)
  return out[:, :t, :, :h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, plan):
  """Attention on padded arrays; `seg` is None or (q ids, kv ids); `plan` is static."""
  return _BACKENDS[plan.backend].forward(q, k, v, seg, plan, save_lse=False)[0]


def _flash_fwd(q, k, v, seg, plan):
  o, lse = _BACKENDS[plan.backend].forward(q, k, v, seg, plan, save_lse=True)
  return o, (q, k, v, seg, o, lse)  # lse `[B, N, Tp]` float32: O(T) residual, no T x S


def _flash_bwd(plan, res, do):
  q, k, v, seg, o, lse = res
  delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _BACKENDS[plan.backend].backward(q, k, v, seg, lse, delta, do, plan)
  return dq, dk, dv, None  # segment ids are integers: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _rule(name: str):
  """The mesh axes (None, a name or a tuple) that lmjax's logical rules give `name`."""
  return nn.logical_to_mesh_axes((name,), LOGICAL_RULES)[0]


def _split(axes, dims: list[int], mesh) -> object:
  """`axes` when they are all in `mesh` and their size divides every one of `dims`, else None."""
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if not set(names) <= set(mesh.axis_names):
    return None
  size = math.prod(mesh.shape[a] for a in names)
  return axes if all(d % size == 0 for d in dims) else None


def mesh_flash_attention(
    q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids=None,
    sm_scale: float | None = None, **kwargs,
) -> Array:
  """`flash_attention`, split over the mesh set by `jax.set_mesh` (the function the model gets
  for `attention="flash"`).

  A Pallas kernel is one opaque call that XLA cannot partition (Mosaic refuses a call over more
  than one device), so under a mesh of more than one device this runs it in a `shard_map`: the
  batch over the mesh axes of lmjax's `activation_batch` rule (data, fsdp) and the query and kv
  heads over those of `heads` (tensor), each only where it divides the axis (a GQA model with
  fewer kv heads than the tensor axis keeps its heads whole; the kernel then runs on every
  tensor shard). Heads split in contiguous groups, so query head n still reads kv head
  `n // (N // K)`. With no mesh, a one-device mesh, or inside a `shard_map`, this is
  `flash_attention` itself.

  On a mesh with a `sequence` axis (context parallelism) the queries, keys and values are split
  on their length too; each device gathers every device's keys and values and runs the kernel on
  its own block of queries against the whole sequence (`lmjax.sharding.gather_context` gives the
  causal rule the block's offset). Each device's query length must be a multiple of the kernel's
  query blocks (no padding inside a shard).

  Args:
    q, k, v, causal, segment_ids, sm_scale: as in `flash_attention`.
    **kwargs: `flash_attention`'s `block_sizes`, `interpret` and `backend`.

  Raises:
    ValueError: with a sequence axis, lengths that do not split over it or into whole query
      blocks, or a causal call whose query and key lengths differ (a KV cache).
  """
  b, t, s, n, kh, _ = check_shapes(q, k, v)
  seg = as_segment_ids(segment_ids, t, s)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return flash_attention(q, k, v, causal=causal, segment_ids=seg, sm_scale=sm_scale, **kwargs)
  batch = _split(_rule("activation_batch"), [b], mesh)
  heads = _split(_rule("heads"), [n, kh], mesh) if _rule("heads") == _rule("kv_heads") else None
  length = _context_split(t, s, n, kh, causal, sm_scale, kwargs)
  spec = PartitionSpec(batch, length, heads, None)
  arrays, specs = [q, k, v], [spec, spec, spec]
  if seg is not None:
    arrays.append(seg)
    specs.append(SegmentIds(PartitionSpec(batch, length), PartitionSpec(batch, length)))

  def local(q, k, v, seg=None):
    if length is not None:  # this device's queries against every device's keys
      k, v, q_ids, kv_ids = sharding.gather_context(
          k, v, None if seg is None else seg.q, None if seg is None else seg.kv, causal=causal,
          axis=length)
      seg = None if q_ids is None else SegmentIds(q_ids, kv_ids)
    return flash_attention(q, k, v, causal=causal, segment_ids=seg, sm_scale=sm_scale, **kwargs)

  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=spec,
                       check_vma=False)(*arrays)


def _context_split(t: int, s: int, n: int, kh: int, causal: bool, sm_scale, kwargs):
  """The mesh axis the length splits over (None without a sequence axis), after checking that
  the call can run split: lengths divisible by it, whole query blocks a device, no cache."""
  shards = sharding.sequence_shards()
  if shards == 1:
    return None
  for name, length in (("query", t), ("key", s)):
    if length % shards:
      raise ValueError(f"flash attention on a mesh with sequence={shards}: the {name} length "
                       f"{length} does not split over it; make it a multiple of {shards}")
  if causal and t != s:
    raise ValueError(f"flash attention on a mesh with sequence={shards} needs a causal call's "
                     f"query and key lengths equal (got T={t}, S={s}: a KV cache); decode on a "
                     "mesh with mesh.sequence=1")
  kind, interp = _resolve_backend(kwargs.get("backend"), kwargs.get("interpret"))
  if kind != "reference":
    local = t // shards
    scale = 1.0 if sm_scale is None else sm_scale
    plan = _make_plan(kind, interp, causal, scale, local, s, n, kh, kwargs.get("block_sizes"))
    if plan.t_pad != local:
      block = math.lcm(plan.block_q, plan.block_q_dkv, plan.block_q_dq)
      raise ValueError(
          f"flash attention on a mesh with sequence={shards}: each device's {local} queries "
          f"(sequence length {t} / {shards}) must be a multiple of the kernel's query blocks "
          f"({block}); make the sequence length a multiple of {shards * block}, or pass "
          "smaller block_sizes")
  return sharding.SEQUENCE_AXIS


# The model reaches the kernel by name: `TransformerConfig(attention="flash")`.
register_attention("flash", mesh_flash_attention)
