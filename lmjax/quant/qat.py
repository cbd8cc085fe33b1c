"""Quantization-aware training: fake quantization with a straight-through estimator.

In the forward pass each quantized weight is replaced by `dequantize(quantize(w))`, exactly
what `lmjax.quant.quantize` then serves (same formats, groups and group axes), so what is
trained is what is served. The backward pass treats the rounding as the identity (the
straight-through estimator, Bengio et al., 2013; as used for QAT by Jacob et al., 2018): the
gradient of the float weight is the gradient of the fake-quantized one. Absmax scales never
clip a weight, so nothing is masked.

    with lmjax.quant.qat.training("int4", group_size=32):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)   # model.apply inside
    qparams = lmjax.quant.quantize(model, params, "int4", group_size=32)   # serve the same

`fake_quant_params(model, params, ...)` does the same on a params tree instead of inside the
modules: the tree a training job's loss reads (`train.qat`), so that only the trained model's
weights are fake-quantized and a reference or teacher model beside it stays float.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax

from lmjax.quant.apply import interceptor
from lmjax.quant.qarray import dequantize, quantize_array
from lmjax.quant.quantize import DEFAULT_GROUP, MODEL_FORMATS, dequantize_params, quantize

Array = jax.Array


def fake_quant(w: Array, fmt: str, group_size: int | None = None, axis: int = 0) -> Array:
  """`dequantize(quantize_array(w, ...))` in the forward, the identity in the backward.

  Args:
    w: a float weight.
    fmt: "int8", "int4" or "nf4".
    group_size: weights per group along `axis` (None: the whole axis).
    axis: the group axis.

  Returns:
    An array like `w` holding the quantized values, with `d out / d w = 1`.
  """
  q = dequantize(quantize_array(jax.lax.stop_gradient(w), fmt, group_size, axis), w.dtype)
  return w + jax.lax.stop_gradient(q - w)


@contextlib.contextmanager
def training(fmt: str, group_size: int | None = -1, *, embeddings: bool | str = True,
             head: bool | str = True) -> Iterator[None]:
  """Within this context `model.apply` with float params computes with fake-quantized
  weights: the same weights, formats and groups as `quantize(model, params, fmt, group_size,
  embeddings=..., head=...)`.

  Raises:
    ValueError: an unknown format.
  """
  if fmt not in MODEL_FORMATS:
    raise ValueError(f"unknown QAT format {fmt!r}; formats are {MODEL_FORMATS}")

  choices = {"einsum": True, "embedding": embeddings, "head": head}

  def read(w, axis, dtype, role):
    choice = choices[role]
    if choice is False:
      return w.astype(dtype)
    f = fmt if choice is True else choice
    g = DEFAULT_GROUP[f] if group_size == -1 else group_size
    return fake_quant(w, f, g, axis).astype(dtype)

  with nn.intercept_methods(interceptor(read, quantized_only=False)):
    yield


def fake_quant_params(model: nn.Module, params, fmt: str, group_size: int | None = -1, *,
                      embeddings: bool | str = True, head: bool | str = True):
  """`params` with every weight that `quantize(model, params, fmt, ...)` quantizes replaced by
  its dequantized value in the forward, and the identity in the backward (straight-through).

  Exact: the forward values are `dequantize_params(quantize(...))` bit for bit (the gradient
  path is added as `w - stop_gradient(w)`, an exact zero); other leaves pass unchanged.

  Args:
    model: the model `params` belong to (`lmjax.CausalLM`, ...).
    params: its raw float params tree (traced inside `jax.jit`/`jax.grad`, or concrete).
    fmt, group_size, embeddings, head: as `lmjax.quant.quantize` takes them.

  Returns:
    A tree like `params`.

  Raises:
    ValueError: as `quantize` (an unknown format, a group size not dividing a weight).
  """
  frozen = jax.lax.stop_gradient(params)
  served = dequantize_params(quantize(model, frozen, fmt, group_size, embeddings=embeddings,
                                      head=head))
  return jax.tree.map(lambda w, w0, q: q.astype(w.dtype) + (w - w0), params, frozen, served)
