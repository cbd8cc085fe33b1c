"""4-bit NormalFloat (NF4) weights, as in QLoRA (Dettmers et al., 2023, arXiv:2305.14314).

NF4 stores each weight as one of 16 levels that are quantiles of a standard normal, scaled per
block of `block_size` weights by the block's absolute maximum. With double quantization the
block scales are themselves quantized to 8 bits in blocks of 256. The public names here are
the ones QLoRA code imports:

    q = quantize_nf4(w, block_size=64, double_quant=True)   # a QArray pytree (jit-friendly)
    w_hat = dequantize(q, jnp.bfloat16)                      # the weight back, inside jit too

`q` is an `lmjax.quant.QArray` (fmt "nf4"): uint8 bytes holding two codes each, the block
scales, and the static original shape and dtype.
"""

from __future__ import annotations

import jax
import numpy as np

from lmjax.quant.qarray import NF4_TABLE, QArray, dequantize, nf4_index, quantize_array

__all__ = ["NF4_TABLE", "QArray", "dequantize", "nf4_index", "normal_float_table",
           "quantize_nf4"]


def quantize_nf4(w: jax.Array, block_size: int = 64, double_quant: bool = True,
                 axis: int | None = None) -> QArray:
  """NF4-quantizes `w` in blocks of `block_size` consecutive weights along one axis.

  Args:
    w: any float array, e.g. a kernel `[D, F]` or `[D, N, H]`.
    block_size: weights per block (even; it must divide the length of the block axis).
    double_quant: quantize the block scales to int8 in blocks of 256 (QLoRA's double
      quantization: 4.127 instead of 4.5 bits per weight at block size 64).
    axis: the block axis; default the first axis whose length `block_size` divides.

  Returns:
    A `QArray` (fmt "nf4") whose `dequantize` has `w`'s shape and dtype.

  Raises:
    ValueError: `block_size` divides no axis of `w` (or not the given one), or is odd.
  """
  shape = tuple(w.shape)
  if axis is None:
    axis = next((i for i, n in enumerate(shape) if block_size > 0 and n % block_size == 0),
                None)
    if axis is None:
      raise ValueError(f"block size {block_size} divides no axis of shape {shape}; pass a "
                       "block size that divides one of them")
  return quantize_array(w, "nf4", block_size, axis, double_quant)


def normal_float_table(offset: float = 0.9677083) -> np.ndarray:
  """The 16 NF4 levels derived from normal quantiles (QLoRA eq. 4, asymmetric variant):
  8 positive quantiles at probabilities from `offset` down to 0.5, 7 negative, and zero,
  each side normalized to [-1, 1]."""
  from scipy.stats import norm  # only needed to re-derive the table

  pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  v = np.sort(np.concatenate([pos, [0.0], neg]))
  return (v / np.max(np.abs(v))).astype(np.float32)
