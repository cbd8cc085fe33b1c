"""The hand-written CPU product for packed 4-bit weights (`lmjax.quant.cpu_int4`): the custom
call against float64 numpy of its stated math (inputs rounded to int8 per group, integer dot
products, both scales), a packed int4 model's decoding against `model.apply` on dequantized
weights with each projection's input rounded the same way, where it applies, and a failed
build."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import packed
from lmjax.layers import project_split
from lmjax.quant import cpu_int4, packed_int4
from tests.lmjax.helpers import random_params, tiny, tokens

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="the CPU int4 kernel needs "
                                "an x86-64 CPU with AVX2 and a C++20 compiler")


def _np_round_groups(x, group):
  """`x [M, K]` rounded to int8 per group of `group` inputs as the kernel states it: codes
  `round_half_even(x * (127 / absmax))` in float32 arithmetic, scales `absmax / 127`; (codes,
  float64 scales `[M, G]`)."""
  g = np.asarray(x, np.float32).reshape(len(x), -1, group)
  amax = np.abs(g).max(-1, keepdims=True)
  inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
  q = np.round(g * inv.astype(np.float32))
  return q.reshape(np.shape(x)).astype(np.float64), (amax[..., 0] / np.float32(127)).astype(
      np.float64)


def _np_product(x, b, scale):
  """float64 reference: codes unpacked from the row halves, each group's integer dot product
  with the rounded inputs summed exactly, then `sx * (scale * dot + offset * sum(xq))`."""
  n, half = b.shape
  g = scale.shape[1]
  gs = 2 * half // g
  codes = np.concatenate([b & 15, b >> 4], axis=1).astype(np.int64)  # [N, K], input order
  xq, sx = _np_round_groups(x, gs)
  xq = xq.astype(np.int64).reshape(len(x), g, gs)
  dot = np.einsum("mGg,nGg->mnG", xq, codes.reshape(n, g, gs)).astype(np.float64)
  s, z = (np.asarray(scale[..., i], np.float64) for i in (0, 1))
  terms = sx[:, None, :] * (s[None] * dot + z[None] * xq.sum(-1)[:, None, :].astype(np.float64))
  size = np.abs(sx[:, None, :] * s[None] * dot).sum(-1) + np.abs(
      sx[:, None, :] * z[None] * xq.sum(-1)[:, None, :]).sum(-1)
  return terms.sum(-1), size


def _inputs(rows, k, group, seed):
  """Rows of very different magnitudes, an all-zero group, and a group of exact ties
  (x / scale = +-0.5, 1.5, 2.5: half to even gives 0, 2, 2)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
  x[0, :group] = 0
  x[-1, group:2 * group] = np.resize([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.0], group)
  return x.astype(np.float32)


@pytest.mark.parametrize("m,n,k,group", [(1, 37, 128, 32), (2, 8, 192, 32), (5, 41, 256, 64),
                                         (9, 16, 128, 32), (16, 6, 512, 128), (1, 37, 1152, 32),
                                         (3, 19, 1536, 32), (3, 10, 64, 16)])
def test_product_equals_float64_reference(m, n, k, group):
  """The kernel where it applies; groups of 16 (last case): the same rounded inputs through
  XLA's weight-only loop."""
  rng = np.random.default_rng(m * n)
  b = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  scale = np.stack([rng.random((n, k // group)) / 50 + 1e-3,
                    rng.standard_normal((n, k // group)) / 20], -1).astype(np.float32)
  x = _inputs(m, k, group, m)
  kernel = group % 32 == 0
  assert cpu_int4.applies(jnp.asarray(x), jnp.asarray(b), jnp.asarray(scale)) == kernel
  f = jax.jit(lambda x, b, s: cpu_int4.matmul_t(x, b, s, _xla_loop))
  assert (cpu_int4.TARGET in f.lower(x, b, scale).as_text()) == kernel
  got = np.asarray(f(x, b, scale), np.float64)
  want, size = _np_product(x, b, scale)
  assert np.all(np.abs(got - want) <= 2e-6 * size + 1e-30)  # relative to the terms' sizes
  # The plain jnp statement of the same math agrees, and the unrounded product does not.
  np.testing.assert_allclose(np.asarray(cpu_int4.reference(x, b, scale)), want,
                             atol=2e-6 * size.max())
  plain = x.astype(np.float64) @ np.asarray(packed_int4.dequantized(b, scale), np.float64).T
  assert np.abs(plain - want).max() > 30 * np.abs(got - want).max()


def test_nan_inputs_give_nan_outputs():
  rng = np.random.default_rng(0)
  b = rng.integers(0, 256, (5, 64), dtype=np.uint8)
  scale = (rng.random((5, 4, 2)) / 50 + 1e-3).astype(np.float32)
  x = rng.standard_normal((2, 128)).astype(np.float32)
  x[0, 37] = np.nan  # one input of the first row's second group
  got = np.asarray(jax.jit(lambda x, b, s: cpu_int4.matmul_t(x, b, s, _xla_loop))(x, b, scale))
  assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()
  assert np.isnan(np.asarray(cpu_int4.reference(x, b, scale))[0]).all()


def _xla_loop(x, b, s):
  return packed_int4._xla_matmul_t(x, b, s, len(x) == 1, packed._flat_copy)


def _model():
  cfg = tiny(model_dim=64, num_heads=2, num_kv_heads=1, ffn_dim=128, tie_embeddings=True)
  model = lmjax.model_for(cfg)
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def _round_groups(x, k, group=32):
  """`x [..., inputs]` (the last `k` dims are inputs) rounded to int8 per group, in jnp."""
  flat = x.reshape(-1, math.prod(x.shape[x.ndim - k:]))
  g = flat.reshape(len(flat), -1, group)
  s = jnp.max(jnp.abs(g), axis=-1, keepdims=True) / 127
  return (jnp.round(g / jnp.where(s > 0, s, 1.0)) * s).reshape(x.shape)


def _reference(model, weights, toks):
  """`model.apply` on the dequantized weights with each projection's input rounded per row
  (token) and group of 32, no cache, over all of `toks`: the logits `[T, V]` (causal: row t
  is what decoding computes after token t, rounding row by row as the kernel does)."""
  def round_input(next_fun, args, kwargs, context):
    m = context.module
    if packed.module_role(m, context.method_name) == "einsum":
      args = (_round_groups(args[0], project_split(m.eqn)),) + args[1:]
    return next_fun(*args, **kwargs)
  def apply(w, t):
    with nn.intercept_methods(round_input):
      return model.apply({"params": w}, t)
  return np.asarray(jax.jit(apply)(weights, jnp.asarray([toks]))[0], np.float64)


def test_decoding_equals_rounded_input_reference():
  model, params = _model()
  pk = packed.pack(model, params, "int4", activations="int8")  # groups of 32: the kernel's
  weights = packed_int4.unpack(pk)
  prompt, n = [5, 6, 7, 8, 9], 10
  step = jax.jit(lambda p, t: packed.apply(model, p, t))
  assert cpu_int4.TARGET in step.lower(pk, tokens(0, 1, 1)).as_text()  # the kernel, not XLA's
  out = infer.generate(model, pk, [prompt], max_new_tokens=n, ignore_eos=True,
                       return_logits=True)
  # The prompt's 5 rows also go through the kernel (a few rows); the reference rounds each
  # projection's input per row and group wherever it has fewer than 17 rows: all of them here.
  want = _reference(model, weights, prompt + out.tokens[0])[len(prompt) - 1:-1]
  got = np.asarray(out.logits[0], np.float64)
  assert out.tokens[0] == list(want.argmax(-1)) and len(set(out.tokens[0])) > 1
  np.testing.assert_allclose(got, want, atol=2e-4)
  # Weight-only packed int4 (the default): float inputs, further from this reference.
  plain = infer.generate(model, pk.replace(activations=None), [prompt], max_new_tokens=n,
                         ignore_eos=True, return_logits=True)
  assert np.abs(np.asarray(plain.logits[0]) - want).max() > 10 * np.abs(got - want).max()
  # A prompt of 17 rows or more (and the int8 embedding's head in it) stays weight-only.
  long = tokens(2, 1, cpu_int4.MAX_ROWS + 4)
  np.testing.assert_array_equal(np.asarray(step(pk, long)),
                                np.asarray(step(pk.replace(activations=None), long)))


def test_where_it_applies_and_a_failed_build(monkeypatch, tmp_path):
  x, b = jnp.zeros((1, 128)), jnp.zeros((8, 64), jnp.uint8)
  assert cpu_int4.applies(x, b, jnp.zeros((8, 4, 2)))         # groups of 32
  assert not cpu_int4.applies(x, b, jnp.zeros((8, 8, 2)))     # groups of 16
  assert not cpu_int4.applies(x, b, jnp.zeros((8, 2, 1)))     # nf4: an absmax per group
  assert not cpu_int4.applies(jnp.zeros((17, 128)), b, jnp.zeros((8, 4, 2)))  # a prompt
  assert not cpu_int4.applies(jnp.zeros((1, 192)), jnp.zeros((8, 96), jnp.uint8),
                              jnp.zeros((8, 3, 2)))  # a group of 64 across the two halves
  with pytest.raises(ValueError, match="int8 activations need format 'int8' or 'int4'"):
    packed.pack(*_model(), "nf4", activations="int8")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(RuntimeError, match="false failed"):
    cpu_int4._build()
  assert not list(tmp_path.rglob("*.so"))  # nothing half-built left for the next run
