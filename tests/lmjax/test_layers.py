"""The hand-written norm gradient against float64 autodiff of the textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax.layers import Norm, normalize, project


def textbook_norm(x, scale, bias, rms, eps):
  """The formula as written in the papers, for autodiff in float64."""
  if rms:
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  else:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(jnp.mean((x - mean) ** 2, axis=-1, keepdims=True) + eps)
  y = y * scale[None, None, :]
  return y if bias is None else y + bias[None, None, :]


@pytest.mark.parametrize("rms,with_bias", [(False, True), (False, False), (True, False)])
def test_normalize_value_and_grads_match_float64_autodiff(rms, with_bias):
  ks = jax.random.split(jax.random.key(0), 5)
  x = 3.0 * jax.random.normal(ks[0], (2, 5, 16)) + 0.7  # an offset, as residual streams have
  scale = 1.0 + 0.3 * jax.random.normal(ks[1], (16,))
  bias = 0.2 * jax.random.normal(ks[2], (16,)) if with_bias else None
  cot = jax.random.normal(ks[3], (2, 5, 16))
  eps = 1e-5

  def loss(fn, x, scale, bias):
    return jnp.sum(fn(x, scale, bias, rms, eps) * cot.astype(x.dtype))

  argnums = (1, 2, 3) if with_bias else (1, 2)
  got = normalize(x, scale, bias, rms, eps)
  got_grads = jax.grad(loss, argnums)(normalize, x, scale, bias)
  with jax.enable_x64(True):
    x64, s64 = np.asarray(x, np.float64), np.asarray(scale, np.float64)
    b64 = None if bias is None else np.asarray(bias, np.float64)
    want = textbook_norm(x64, s64, b64, rms, eps)
    want_grads = jax.grad(loss, argnums)(textbook_norm, x64, s64, b64)
    want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)


def test_norm_module_bfloat16_compute_keeps_float32_statistics():
  cfg = lmjax.TransformerConfig.from_preset("tiny", dtype="bfloat16")
  x = 5.0 * jax.random.normal(jax.random.key(1), (2, 3, cfg.model_dim))
  m = Norm(cfg)
  params = m.init(jax.random.key(0), x)
  y = m.apply(params, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  xb = np.asarray(x.astype(jnp.bfloat16), np.float64)
  # the scale starts at one and the bias at zero
  want = textbook_norm(xb, np.ones(cfg.model_dim), None, cfg.norm == "rmsnorm", cfg.norm_eps)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("eqn,x_shape,w_shape", [
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5)),   # 2-D path: one contracted dim
    ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8)),  # 2-D path: two contracted dims
    ("BTD,DF->BTF", (2, 3, 8), (8, 6)),
    ("BTD,VD->BTV", (2, 3, 8), (9, 8)),          # einsum fallback: w contracted on its last
    ("BTNH,HND->BTD", (2, 3, 4, 5), (5, 4, 8)),  # einsum fallback: a different order
])
def test_project_equals_einsum(eqn, x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  want = np.einsum(eqn.lower(), np.asarray(x, np.float64),
                   np.asarray(w, np.float64))
  np.testing.assert_allclose(np.asarray(project(eqn, x, w)), want, rtol=1e-5, atol=1e-5)
