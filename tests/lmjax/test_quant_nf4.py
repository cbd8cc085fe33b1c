"""NF4 (QLoRA) quantization against numpy references and the paper's code table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.quant import nf4
from lmjax.quant.nf4 import NF4_TABLE, dequantize, quantize_nf4


def np_nf4(w, block, axis):
  """float64 numpy reference: nearest NF4 level of w / absmax per block along `axis`."""
  x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  g = x.reshape(x.shape[:-1] + (-1, block))
  absmax = np.abs(g).max(-1, keepdims=True)
  absmax = np.where(absmax > 0, absmax, 1.0)
  codes = np.abs((g / absmax)[..., None] - NF4_TABLE.astype(np.float64)).argmin(-1)
  out = NF4_TABLE.astype(np.float64)[codes] * absmax
  return codes, np.moveaxis(out.reshape(x.shape), -1, axis)


def test_code_table_from_the_paper():
  # QLoRA / qwix numerics test: absmax 1 -> these codes.
  y = jnp.array([-1.0, -0.5, 0.0, 0.8, 1.0])
  np.testing.assert_array_equal(np.asarray(nf4.nf4_index(y)), [0, 2, 7, 14, 15])
  q = quantize_nf4(jnp.array([-1.0, -0.5, 0.0, 0.8, 1.0, 0.0, 0.0, 0.0]), block_size=8,
                   double_quant=False)
  b = np.asarray(q.qvalue)  # packed: byte j holds codes j (low) and j + 4 (high)
  codes = np.concatenate([b & 15, b >> 4])
  np.testing.assert_array_equal(codes[:5], [0, 2, 7, 14, 15])
  assert q.qvalue.dtype == jnp.uint8 and q.qvalue.shape == (4,)


def test_table_is_the_normal_quantiles():
  pytest.importorskip("scipy")
  np.testing.assert_allclose(nf4.normal_float_table(), NF4_TABLE, atol=1e-6)
  assert len(set(NF4_TABLE.tolist())) == 16 and NF4_TABLE[7] == 0.0


@pytest.mark.parametrize("shape,axis", [((128, 48), 0), ((6, 3, 64), 2)])
def test_round_trip_matches_numpy(shape, axis):
  w = jax.random.normal(jax.random.key(0), shape) * 0.05
  q = quantize_nf4(w, block_size=64, double_quant=False, axis=axis)
  _, ref = np_nf4(np.asarray(w), 64, axis)
  got = jax.jit(dequantize)(q)
  assert got.shape == shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)


def test_default_axis_is_first_divisible_and_dtype_kept():
  w = (jax.random.normal(jax.random.key(1), (9, 64, 32)) * 0.02).astype(jnp.bfloat16)
  q = quantize_nf4(w)  # 9 is not a multiple of 64: blocks run along axis 1
  assert q.axis == 1 and q.qvalue.shape == (9, 32, 32) and q.scale.shape == (9, 1, 32)
  out = dequantize(q)
  assert out.dtype == jnp.bfloat16 and out.shape == w.shape
  assert dequantize(q, jnp.float32).dtype == jnp.float32


def test_double_quant_error_bound_and_size():
  w = jax.random.normal(jax.random.key(2), (256, 512)) * 0.03
  single = quantize_nf4(w, double_quant=False)
  double = quantize_nf4(w, double_quant=True)
  assert double.scale.dtype == jnp.int8 and double.scale2.shape == (8,)  # 2048 scales / 256
  assert nf4.QArray.nbytes.fget(double) < nf4.QArray.nbytes.fget(single)
  bits = 8 * double.nbytes / w.size
  assert 4.1 < bits < 4.15  # QLoRA: 4 + 8/64 + 32/(64*256)
  # Per block: half the widest gap between NF4 levels times absmax, plus the scale's own error
  # (half an int8 step of the largest |scale - mean| in its 256-block).
  wn = np.asarray(w, np.float64).reshape(4, 64, 512)
  absmax = np.abs(wn).max(1)
  half_gap = np.max(np.diff(NF4_TABLE)) / 2
  scale_err = np.abs(absmax - absmax.mean()).max() / 127 / 2 + 1e-7
  err = np.abs(np.asarray(dequantize(double), np.float64).reshape(4, 64, 512) - wn).max(1)
  assert np.all(err <= half_gap * absmax + scale_err + 1e-6)
  _, ref = np_nf4(np.asarray(w), 64, 0)
  assert np.abs(np.asarray(dequantize(double)) - ref).max() <= scale_err + 1e-6


def test_pytree_and_jit():
  w = jax.random.normal(jax.random.key(3), (64, 8))
  q = quantize_nf4(w)
  leaves = jax.tree.leaves(q)
  assert {jnp.dtype(x.dtype).name for x in leaves} == {"uint8", "int8", "float32"}
  y = jax.jit(lambda q, x: x @ dequantize(q))(q, jnp.ones((2, 64)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.ones((2, 64)) @ dequantize(q)),
                             rtol=1e-5, atol=1e-6)


def test_bad_block_size():
  with pytest.raises(ValueError, match="divides no axis"):
    quantize_nf4(jnp.ones((9, 10)), block_size=64)
  with pytest.raises(ValueError, match="must be even"):
    quantize_nf4(jnp.ones((9, 10)), block_size=3, axis=0)
  with pytest.raises(ValueError, match="does not divide"):
    quantize_nf4(jnp.ones((9, 10)), block_size=4, axis=1)
