"""Running a model on quantized weights: `QuantParams` and the `nn.intercept_methods` reader.

The model code is unchanged. Under `reading()`, every `Einsum` whose kernel is a `QArray`, the
token embedding (lookup and tied output projection) and an untied LM head compute from the
quantized arrays: a kernel is dequantized to the compute dtype right before its projection
(inside the jitted step, so XLA fuses the widening into the product where the backend can),
an embedding lookup dequantizes only the rows it gathers. Other modules read their float
params as usual.

    qparams = lmjax.quant.quantize(model, params, "int8")
    logits = lmjax.quant.apply(model, qparams, tokens)           # a plain forward pass
    out = infer.generate(model, qparams, prompts, ...)           # any decoding entry point
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import packed as packed_lib
from lmjax.embeddings import TokenEmbedding
from lmjax.layers import Einsum, dtype_of, einsum_f32, project, project_split
from lmjax.quant.qarray import QArray, dequantize, scales_of
from lmjax.sharding import constrain

Array = jax.Array


@flax.struct.dataclass
class QuantParams:
  """A model's params with some weights as `QArray`s (see `lmjax.quant.quantize`).

  Attributes:
    tree: the raw params tree; quantized weights are `QArray` leaves in the place of the
      float arrays (with scanned layers, each leaf of a `QArray` has the layers axis first and
      its static `shape` is one layer's).
    fmt: the format asked for ("int8", "int4", "nf4", or "gguf" for kept GGUF blocks).
    layers: the paths of `QArray`s stacked over scanned layers.
  """

  tree: Any
  fmt: str = flax.struct.field(pytree_node=False, default="int8")
  layers: tuple[tuple[str, ...], ...] = flax.struct.field(pytree_node=False, default=())


def read_quantized(w: Array | QArray, axis: int, dtype, role: str) -> Array:
  """The weight a layer computes with: a `QArray` dequantized, a float array as it is."""
  del axis, role  # a QArray knows its own group axis
  return dequantize(w, dtype) if isinstance(w, QArray) else w.astype(dtype)


def _einsum(m: Einsum, x: Array, read) -> Array:
  dtype = dtype_of(m.dtype)
  w = read(m.get_variable("params", "kernel"), project_split(m.eqn) - 1, dtype, "einsum")
  y = project(m.eqn, x.astype(dtype), w)
  if m.bias_axes is not None:
    b = m.get_variable("params", "bias").astype(dtype)
    y = y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)
  return y


def take_rows(q: QArray, ids: Array, dtype) -> Array:
  """`dequantize(q)[ids]` for a `[V, D]` table grouped along D, gathering codes first."""
  if q.axis != 1 or len(q.shape) != 2:
    return jnp.take(dequantize(q, dtype), ids, axis=0)
  rows = QArray(jnp.take(q.qvalue, ids.reshape(-1), axis=0),
                jnp.take(scales_of(q), ids.reshape(-1), axis=0),
                None if q.zero is None else jnp.take(q.zero, ids.reshape(-1), axis=0),
                fmt=q.fmt, shape=(ids.size, q.shape[1]), dtype=q.dtype, axis=1, group=q.group)
  return dequantize(rows, dtype).reshape(ids.shape + (q.shape[1],))


def _embedding(m: TokenEmbedding, method: str, x: Array, read) -> Array:
  e = m.get_variable("params", "embedding")
  cfg = m.config
  dtype = dtype_of(cfg.dtype)
  if method == "__call__":
    if isinstance(e, QArray):
      h = take_rows(e, x, dtype)
    else:
      h = jnp.take(read(e, 1, dtype, "embedding"), x, axis=0)
    h = h.astype(dtype)
    if cfg.scale_embeddings:
      h = h * jnp.sqrt(jnp.asarray(cfg.model_dim, h.dtype))
    return h
  return einsum_f32("BTD,VD->BTV", x, read(e, 1, x.dtype, "embedding"))


def _head(m: nn.Module, x: Array, read) -> Array:
  w = read(m.get_variable("params", "kernel"), 0, x.dtype, "head")
  logits = einsum_f32("BTD,DV->BTV", x, w)
  return constrain(logits.astype(jnp.float32),
                   ("activation_batch", "activation_length", "activation_vocab"))


def interceptor(read, quantized_only: bool = True):
  """An `nn.intercept_methods` function computing projections, the embedding and an untied
  head from `read(weight, group_axis, dtype, role)` (the model's own code for everything else).
  `quantized_only`: leave an `Einsum` with a float kernel to its own code."""

  def intercept(next_fun, args, kwargs, context):
    m, role = context.module, packed_lib.module_role(context.module, context.method_name)
    if (isinstance(m, TokenEmbedding) and context.method_name == "setup"
        and isinstance(m.get_variable("params", "embedding"), QArray)):
      return None  # its setup would check the float shape; the reader reads the QArray
    if role == "einsum" and (not quantized_only
                             or isinstance(m.get_variable("params", "kernel"), QArray)):
      return _einsum(m, args[0], read)
    if role == "embedding":
      return _embedding(m, context.method_name, args[0], read)
    if role == "head":
      return _head(m, args[0], read)
    return next_fun(*args, **kwargs)
  return intercept


@contextlib.contextmanager
def reading() -> Iterator[None]:
  """Within this context, `model.apply({"params": qparams.tree}, ...)` reads `QArray`s."""
  with nn.intercept_methods(interceptor(read_quantized)):
    yield


def apply(model: nn.Module, qparams: QuantParams, *args, **kwargs):
  """`model.apply` with quantized params: the same arguments and results as the float model."""
  with reading():
    return model.apply({"params": qparams.tree}, *args, **kwargs)


def loop_variant(qparams: QuantParams, x: Array) -> tuple[QuantParams, Array]:
  """`(qparams, x)` through one optimization barrier, so that XLA does not hoist the
  dequantization of every weight out of a decode loop (float copies of all weights, read at
  float width each step). `x`: an array the step goes on to read (its token ids); use the
  returned one (`lmjax.packed.loop_variant` says why)."""
  tree, x = jax.lax.optimization_barrier((qparams.tree, x))
  return qparams.replace(tree=tree), x
