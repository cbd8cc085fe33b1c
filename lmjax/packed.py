"""Packed inference weights: matrices stored output-major (bfloat16 or float32), read by a wrapper.

Batch-1 decoding reads every weight once per token, so its speed is the speed at which the
matrix-vector products stream weights. On XLA's CPU backend a bfloat16 weight is slow to read
through the model's own path: its bfloat16 dot and its `astype(float32)` run at ~1 GB/s
(`benchmarks/matvec.py`), and inside a decode loop XLA hoists that conversion out of the loop,
so every step reads float32 weights anyway. `pack` re-lays every projection out once:

- the matrix is transposed to `[outputs..., inputs...]` (output-major, the PyTorch layout)
  and flattened to one matrix `[outputs, inputs]` per layer, so each output is a dot of one
  contiguous row with the input, which XLA's CPU backend emits as a parallel loop that
  streams the row;
- in the "bfloat16" format (the default) it is stored in bfloat16 and widened inside that
  loop by a 16-bit shift of its bits (exactly the float32 value; no rounding), so the loop
  reads 2 bytes per weight. The "float32" format keeps the weights exact: the same loops read
  4 bytes per weight, which on this CPU beat XLA's library matrix-vector product of the
  model's own layout for the small (576-wide) matrices of SmolLM2-sized models.

The model runs unchanged under `reading(packed)`, an `nn.intercept_methods` wrapper that
computes each `Einsum`, the tied embedding lookup and output projection, and an untied LM head
from the packed arrays (activations and accumulation in float32). `infer.decode` recognises
`PackedParams` and keeps the widening inside its loop (`loop_variant`). Products of 2 to 16
rows (speculative verification, small batches) go through `lmjax.packed_rows`, which reads
each weight row once for all rows. On an x86-64 CPU the float formats' products of 1-16 rows
run in a hand-written kernel instead (`lmjax.quant.cpu_float`: the same float32 products,
read faster than XLA's loops). Packed params carry no logical axis names: they are for one
device (or replicated); sharded serving keeps the model's own params.

    packed = lmjax.packed.pack(model, params)           # once, after loading or training
    exact = lmjax.packed.pack(model, params, "float32")  # the same layout, float32 weights
    out = infer.generate(model, packed, prompts, ...)   # any decoding entry point
    logits = lmjax.packed.apply(model, packed, tokens)  # a plain forward pass
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import packed_rows
from lmjax.embeddings import TokenEmbedding
from lmjax.layers import Einsum, dtype_of, project_split
from lmjax.sharding import constrain
from lmjax.transformer import LMHead

Array = jax.Array
FORMATS = ("bfloat16", "float32")
# Integer formats: codes output-major like the float formats, a float32 scale per output and
# group beside each (`<name>_scale`), applied after the row's dot (`lmjax.quant` rounding);
# "int4" / "nf4": two codes per byte, the group scales applied inside the row's loop
# (`lmjax.quant.packed_int4`).
INT_FORMATS = ("int8", "int4", "nf4")
NIBBLE_FORMATS = ("int4", "nf4")  # two codes per byte (`lmjax.quant.packed_int4`)


@flax.struct.dataclass
class PackedParams:
  """A model's params with its projection matrices packed (see the module docstring).

  Attributes:
    tree: the raw params tree; each packed kernel is a matrix `[layers?, outputs, inputs]`
      in the format's dtype (the model's output dims flattened into one, its input dims into
      one), the token embedding `[V, D]` in that dtype.
    fmt: the storage format, one of `FORMATS` ("bfloat16" or "float32").
    packed: `(path, inputs, leading, shape)` of each packed kernel: its path in `tree`, how
      many of the model's kernel dims are inputs, how many leading dims are stacked layers
      (scan), and the model's kernel shape (leading dims included).
    activations: None (weight-only: float32 activations), or "int8". fmt "int8": products of
      at least `lmjax.quant.packed_int.INT8_ACT_MIN_ROWS` rows quantize their input rows to
      int8 and multiply in int32 (`lmjax.quant.packed_int.matmul_int8_act`), products of 1 to
      16 rows (decoding) round their inputs per group of 32 (`lmjax.quant.cpu_int8`). fmt "int4":
      products of up to `lmjax.quant.cpu_int4.MAX_ROWS` rows round their inputs to int8 per
      group (`lmjax.quant.cpu_int4`).
  """

  tree: Any
  fmt: str = flax.struct.field(pytree_node=False, default="bfloat16")
  packed: tuple[tuple[tuple[str, ...], int, int, tuple[int, ...]], ...] = flax.struct.field(
      pytree_node=False, default=())
  activations: str | None = flax.struct.field(pytree_node=False, default=None)


def widen(w: Array) -> Array:
  """float32 from bfloat16 by shifting the bits up 16 places (exact, vectorises on any CPU);
  float32 as it is."""
  if w.dtype == jnp.float32:
    return w
  bits = jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32) << 16
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def module_role(m: nn.Module, method: str) -> str | None:
  """What a weight reader (packed, quantized) computes for this module call: "einsum",
  "embedding", "head", or None (the module runs as it is)."""
  if isinstance(m, Einsum) and method == "__call__" and project_split(m.eqn):
    return "einsum"
  if isinstance(m, TokenEmbedding) and method in ("__call__", "attend"):
    return "embedding"
  if isinstance(m, LMHead) and method == "__call__" and not m.config.tie_embeddings:
    return "head"
  return None


def _kernels(model: nn.Module, tree: Any) -> dict[tuple[str, ...], tuple[int, int]]:
  """Path of every 2-D-able `Einsum` kernel and untied LM head -> (input dims, module ndim)."""
  found: dict[tuple[str, ...], tuple[int, int]] = {}

  def record(next_fun, args, kwargs, context):
    m, role = context.module, module_role(context.module, context.method_name)
    if role == "einsum":
      found[tuple(m.scope.path) + ("kernel",)] = (project_split(m.eqn), len(m.shape))
    elif role == "head":
      found[tuple(m.scope.path) + ("kernel",)] = (1, 2)
    return next_fun(*args, **kwargs)

  cfg = model.config
  tokens = jnp.ones((1, 2), jnp.int32)
  args = (tokens, tokens) if cfg.num_encoder_layers and cfg.num_decoder_layers else (tokens,)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, *args), tree)
  return found


def kernels_of(model: nn.Module, params: Any) -> tuple[dict, dict]:
  """`(flat params, kernels)`: `params` (or `{"params": tree}`) flattened, and `_kernels` of them.

  Raises:
    ValueError: the params tree does not fit the model.
  """
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  try:
    kernels = _kernels(model, params)
  except Exception as e:  # a params tree that does not fit the model
    raise ValueError(f"params do not match {type(model).__name__}: {e}") from e
  return flatten_dict(params), kernels


def pack(model: nn.Module, params: Any, fmt: str = "bfloat16",
         activations: str | None = None) -> PackedParams:
  """Packs `params` of `model` for inference (bfloat16: the weights rounded once).

  Args:
    model: an `lmjax.CausalLM`, `MaskedLM` or `Seq2SeqLM` (scanned layers or not).
    params: its raw params tree (or `{"params": tree}`); left unchanged.
    fmt: the storage format: "bfloat16" (weights rounded once, 2 bytes each), "float32"
      (exact), "int8" (`lmjax.quant.packed_int`), "int4" or "nf4" (`lmjax.quant.packed_int4`:
      two codes per byte, a scale per 32 (nf4: 64) inputs, the embedding int8).
    activations: None (weight-only), or "int8": inputs rounded to int8 where that is faster.
      fmt "int8": prefill-sized products (`lmjax.quant.packed_int.INT8_ACT_MIN_ROWS` rows or
      more) quantize their inputs per row and multiply int8 x int8 in int32; products of 1 to
      16 rows (decoding, speculative checks, small batches) round their inputs per group of 32
      and take integer dot products (`lmjax.quant.cpu_int8`, as llama.cpp's Q8_0 x Q8_0; the
      weight-only product where it does not apply). fmt "int4": products of up to `lmjax.quant.
      cpu_int4.MAX_ROWS` rows (decoding) round their inputs per group and take integer dot
      products (`lmjax.quant.cpu_int4`, W4A8 as llama.cpp's Q4 x Q8); more rows (a prompt)
      and the int8 embedding's head stay weight-only.

  Returns:
    `PackedParams`: every projection matrix transposed to `[outputs..., inputs...]` and
    flattened to `[outputs, inputs]` in `fmt`, the token embedding `[V, D]` in `fmt`,
    everything else (norm scales, biases, position tables) as it was.

  Raises:
    ValueError: an unknown format or activations (or int8 activations with another format
      than "int8" or "int4"), params already packed, or params of another model.
  """
  if fmt not in FORMATS + INT_FORMATS:
    raise ValueError(f"unknown packed format {fmt!r}; formats are {FORMATS + INT_FORMATS}")
  _check_activations(fmt, activations)
  if isinstance(params, PackedParams):
    raise ValueError("params are already packed")
  if fmt in NIBBLE_FORMATS:
    from lmjax.quant import packed_int4  # lmjax.quant imports this module
    return packed_int4.pack(model, params, fmt).replace(activations=activations)
  if fmt in INT_FORMATS:
    from lmjax.quant import packed_int
    return packed_int.pack(model, params, fmt).replace(activations=activations)
  flat, kernels = kernels_of(model, params)
  out, packed = dict(flat), []
  dtype = jnp.dtype(fmt)
  # The copies are made on the host with numpy: one pass per matrix, nothing to compile
  # (eager jnp transposes compiled an executable per shape: most of a cold pack's time).
  for path, (k, ndim) in sorted(kernels.items()):
    w = np.asarray(flat[path])
    lead = w.ndim - ndim
    order = (*range(lead), *range(lead + k, w.ndim), *range(lead, lead + k))
    # One matrix per layer, so the reader's product is a plain `[M, K] x [N, K]^T`.
    matrix = w.shape[:lead] + (math.prod(w.shape[lead + k:]), math.prod(w.shape[lead:lead + k]))
    out[path] = jnp.asarray(np.transpose(w, order).reshape(matrix).astype(dtype))
    packed.append((path, k, lead, tuple(w.shape)))
  for path in flat:
    if path[-2:] == ("embed", "embedding"):
      out[path] = jnp.asarray(np.asarray(flat[path]).astype(dtype))
  return PackedParams(unflatten_dict(out), fmt, tuple(packed))


# What int8 activations mean per format: int8 weights, int8 x int8 per row for prompts and
# per group of 32 for 1-16 rows (`lmjax.quant.cpu_int8`; the int8 embedding's head included);
# int4 weights, the 4-bit products of up to 16 rows rounded per group
# (`lmjax.quant.cpu_int4`), prompts (and the int8 head) weight-only.
_ACTS = {"int8": "w8a8", "int4": "w4a8"}


def _check_activations(fmt: str, activations: str | None) -> None:
  if activations is not None and (activations != "int8" or fmt not in _ACTS):
    raise ValueError(f"activations={activations!r} with format {fmt!r}: int8 activations "
                     "need format 'int8' or 'int4' (activations='int8'); other formats take "
                     "None")


def unpack(packed: PackedParams) -> Any:
  """The raw params tree back: packed matrices in the model's layout, as float32."""
  if packed.fmt in NIBBLE_FORMATS:
    from lmjax.quant import packed_int4
    return packed_int4.unpack(packed)
  if packed.fmt in INT_FORMATS:
    from lmjax.quant import packed_int
    return packed_int.unpack(packed)
  flat = flatten_dict(packed.tree)
  for path, k, lead, shape in packed.packed:
    nfree = len(shape) - lead - k
    w = widen(flat[path]).reshape(shape[:lead] + shape[lead + k:] + shape[lead:lead + k])
    order = (*range(lead), *range(lead + nfree, len(shape)), *range(lead, lead + nfree))
    flat[path] = jnp.transpose(w, order)
  for path in flat:
    if path[-2:] == ("embed", "embedding"):
      flat[path] = widen(flat[path])
  return unflatten_dict(flat)


# Products with at most this many rows (batch-1 decoding) stream each packed row through one
# loop per output, and decode loops with at most this many rows keep the widening inside the
# loop (`loop_variant`). A few more (a speculative verify step, a small batch: up to
# `lmjax.packed_rows.MAX_ROWS`) read each weight row once for all rows (`lmjax.packed_rows`).
# More rows (a prompt's prefill) use XLA's matmul on the widened matrix, which XLA hoists
# out of a decode loop (float32 copies for the loop's duration; 8 rows ran 0.82x (smollm2
# shape) to 0.91x (demo) as fast as the model's own float32 params, `benchmarks/decode.py`).
MAX_STREAMED_ROWS = 1


def _matmul_t(x: Array, w: Array, scale: Array | None = None, acts: str | None = None) -> Array:
  """`x [M, K] @ widen(w [N, K]).T` in float32 (integer codes: times `scale` `[N, G]`; `acts`:
  "w8a8" or "w4a8", `_ACTS` of `PackedParams.activations`, else None)."""
  x = x.astype(jnp.float32)
  if acts and w.dtype == jnp.int8:  # opt-in int8 activations
    from lmjax.quant import cpu_int8, packed_int
    if acts == "w8a8" and x.shape[0] >= packed_int.INT8_ACT_MIN_ROWS:  # a prompt: per row
      return packed_int.matmul_int8_act(x, w, scale)
    if (acts == "w8a8" and x.shape[0] <= cpu_int8.MAX_ROWS
        and x.shape[1] % cpu_int8.GROUP == 0 and scale.shape[-1] == 1):
      # Decoding (one row), speculative checks, small batches: inputs rounded per group of
      # 32, integer dot products (`lmjax.quant.cpu_int8`).
      return cpu_int8.matmul_t(x, w, scale, functools.partial(_matmul_t, acts=None))
  if w.dtype == jnp.uint8:  # int4 / nf4: two codes per byte
    from lmjax.quant import packed_int4
    return packed_int4.matmul_t(x, w, scale, x.shape[0] <= MAX_STREAMED_ROWS, _flat_copy, acts)
  if (x.shape[0] > MAX_STREAMED_ROWS and packed_rows.applies(x.shape[0])
      and (scale is None or scale.shape[-1] == 1)):  # a few rows: each weight row read once
    return packed_rows.matmul_t(x, w, scale)
  if scale is not None:
    from lmjax.quant import packed_int
    return packed_int.matmul_t(x, w, scale, x.shape[0] <= MAX_STREAMED_ROWS, _flat_copy)
  if x.shape[0] <= MAX_STREAMED_ROWS:  # one loop per output streams its row of w
    from lmjax.quant import cpu_float  # on an x86-64 CPU its kernel reads faster
    return cpu_float.matmul_t(x, w, _streamed)
  if w.dtype == jnp.float32:  # XLA's matmul reads the transposed matrix as it is
    return jnp.dot(x, w.T)  # (a copied [K, N] layout made SmolLM2's prefill 1.7x slower)
  # A matmul: the widened matrix in `[K, N]` layout (hoisted out of a decode loop by XLA).
  return jnp.dot(x, jax.lax.optimization_barrier(widen(w).T))


def _streamed(x: Array, w: Array) -> Array:
  """One row times float weights in XLA: one loop per output streams its row of w."""
  return jnp.dot(_flat_copy(x), widen(w).T)


def _flat_copy(x: Array) -> Array:
  """`x` `[M, K]` written out as its own flat array, never fused into the product that reads it.

  XLA's CPU backend fuses the producer of a matrix-vector product's vector into the product's
  loop and re-evaluates it once per weight: through a reshape of a multi-dim array (the
  attention output `[K, G, H]` read as `N * H` inputs) that is an index division per weight,
  and the attention output projection of SmolLM2 ran at ~1/8 the speed of the query
  projection of the same size; the SwiGLU product fused into the down projection cost it a
  third of its speed. A reduction is never fused into a dot, so summing `x` with zeros over a
  new axis of two materialises it in `[M, K]` (an optimization barrier does not: the CPU
  pipeline removes barriers before fusion). Whole decode step, SmolLM2-135M packed bfloat16
  batch 1: 17.6 ms -> 11.3 ms (a profiled decode loop each, this CPU).
  """
  return jnp.sum(jnp.stack([x, jnp.zeros_like(x)], axis=-1), axis=-1)


def _einsum(m: Einsum, x: Array, acts: str | None) -> Array:
  w = m.get_variable("params", "kernel")  # [outputs, inputs]
  k = project_split(m.eqn)
  free = m.shape[k:]
  lead = x.shape[:x.ndim - k]
  # (inputs from x: int4 codes hold two per byte, so w has half as many columns)
  y = _matmul_t(x.reshape(-1, math.prod(x.shape[len(lead):])), w, _scale(m, "kernel"), acts)
  y = y.reshape(lead + free).astype(dtype_of(m.dtype))
  if m.bias_axes is not None:
    b = m.get_variable("params", "bias").astype(y.dtype)
    y = y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)
  return y


def _scale(m: nn.Module, name: str) -> Array | None:
  """The `[outputs, groups]` scales of an integer-packed weight `name` (None: a float one)."""
  return m.get_variable("params", name + "_scale")


def _embedding(m: TokenEmbedding, method: str, x: Array, acts: str | None) -> Array:
  e = m.get_variable("params", "embedding")  # [V, D] in the packed format
  s = _scale(m, "embedding")  # [V, 1] int8 codes' scales, or None
  cfg = m.config
  if method == "__call__":
    h = widen(jnp.take(e, x, axis=0)) if s is None else (
        jnp.take(e, x, axis=0).astype(jnp.float32) * jnp.take(s, x, axis=0))
    h = h.astype(dtype_of(cfg.dtype))
    if cfg.scale_embeddings:
      h = h * jnp.sqrt(jnp.asarray(cfg.model_dim, h.dtype))
    return h
  lead = x.shape[:-1]
  return _matmul_t(x.reshape(-1, x.shape[-1]), e, s, acts).reshape(lead + (e.shape[0],))


def _head(m: nn.Module, x: Array, acts: str | None) -> Array:
  w = m.get_variable("params", "kernel")  # [V, D] in the packed format
  logits = _matmul_t(x.reshape(-1, x.shape[-1]), w, _scale(m, "kernel"), acts)
  logits = logits.reshape(x.shape[:-1] + (w.shape[0],))
  return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _interceptor(next_fun, args, kwargs, context, acts: str | None = None):
  m, role = context.module, module_role(context.module, context.method_name)
  if role == "einsum":
    return _einsum(m, args[0], acts)
  if role == "embedding":
    return _embedding(m, context.method_name, args[0], acts)
  if role == "head":
    return _head(m, args[0], acts)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def reading(packed: PackedParams) -> Iterator[None]:
  """Within this context, `model.apply({"params": packed.tree}, ...)` reads packed weights."""
  if packed.fmt not in FORMATS + INT_FORMATS:
    raise ValueError(f"unknown packed format {packed.fmt!r}; formats are "
                     f"{FORMATS + INT_FORMATS}")
  _check_activations(packed.fmt, packed.activations)
  acts = _ACTS[packed.fmt] if packed.activations else None
  with nn.intercept_methods(functools.partial(_interceptor, acts=acts)):
    yield


def apply(model: nn.Module, packed: PackedParams, *args, **kwargs):
  """`model.apply` with packed params: same arguments and results as the unpacked model."""
  with reading(packed):
    return model.apply({"params": packed.tree}, *args, **kwargs)


def loop_variant(tree: Any, x: Array) -> tuple[Any, Array]:
  """`(tree, x)` through one optimization barrier: `tree` made to look loop-dependent to XLA.

  Inside a decode `while_loop` XLA would otherwise hoist the widening (bfloat16), the int8 /
  int4 dequantization or the transposed layout copy of every packed weight out of the loop:
  float copies of all weights in memory, read by library products instead of the per-output
  loops. `x` must be an array the loop's step goes on to read (its input token ids), and the
  caller must use the returned `x`: XLA drops a barrier's unused operands, and a barrier left
  with the loop-invariant weights alone is hoisted out of the loop with what follows it (a
  drafter's int8 steps inside the speculative loop read float32 copies: 4x the bytes).
  """
  return jax.lax.optimization_barrier((tree, x))
