"""Few-row products of packed weights (`lmjax.packed_rows`): a forward of 2-16 tokens over a
KV cache (speculative verification) equals the unpacked model on the same weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lmjax
from lmjax import packed, packed_rows, quant
from tests.lmjax.helpers import random_params, tiny, tokens

CONFIGS = {
    "causal": tiny("causal"),
    "causal-untied-qkv-bias": tiny("causal", tie_embeddings=False, qkv_bias=True),
    "causal-scan": tiny("causal", scan_layers=True),
}
CONTEXT = 20  # > MAX_ROWS: the prefill keeps the previous path


@pytest.fixture
def calls(monkeypatch):
  """How many products went through `packed_rows.matmul_t` (counted while tracing)."""
  seen = []
  real = packed_rows.matmul_t

  def spy(x, w, scale=None):
    seen.append(x.shape[0])
    return real(x, w, scale)
  monkeypatch.setattr(packed_rows, "matmul_t", spy)
  return seen


def _model(name):
  model = lmjax.model_for(CONFIGS[name])
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def _rounded(params, dtype):
  """Every matrix and the embedding rounded to `dtype` (what packing stores), in float32."""
  def r(path, a):
    name = jax.tree_util.keystr(path)
    return a.astype(dtype).astype(jnp.float32) if "kernel" in name or "embedding" in name else a
  return jax.tree_util.tree_map_with_path(r, params)


def _verify(apply, cfg, prompt, new):
  """Prefill `prompt`, then one forward of the `new` tokens over the cache (a verify step)."""
  def f(prompt, new):
    cache = lmjax.init_cache(cfg, prompt.shape[0], 48, dtype=jnp.float32)
    _, cache = apply(prompt, cache=cache, prefill=True)
    logits, cache = apply(new, cache=cache)
    return logits, cache.k, cache.v
  return jax.jit(f)(prompt, new)


def _check(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


CASES = [(name, "float32", t) for name in CONFIGS for t in (2, 5, 9, 16)] + [
    ("causal", "bfloat16", 5), ("causal-untied-qkv-bias", "bfloat16", 16),
    ("causal-scan", "bfloat16", 9), ("causal", "int8", 9), ("causal-scan", "int8", 2)]


@pytest.mark.parametrize("name,fmt,t", CASES)
def test_verify_step_equals_the_unpacked_model(name, fmt, t, calls):
  model, params = _model(name)
  cfg = model.config
  pk = packed.pack(model, params, fmt)
  prompt, new = tokens(1, 1, CONTEXT), tokens(2, 1, t)
  got = _verify(lambda *a, **k: packed.apply(model, pk, *a, **k), cfg, prompt, new)
  assert calls and set(calls) == {t}  # the t-token step (not the 20-token prefill)
  if fmt == "int8":  # the int8 reader of the same codes and scales
    qp = quant.quantize(model, params, "int8", per_output=True)
    want = _verify(lambda *a, **k: quant.apply(model, qp, *a, **k), cfg, prompt, new)
  else:
    ref = params if fmt == "float32" else _rounded(params, jnp.bfloat16)
    want = _verify(lambda *a, **k: model.apply({"params": ref}, *a, **k), cfg, prompt, new)
  _check(got, want, 1e-5)
  if (name, t) == ("causal", 5):  # the previous path (XLA's matmul), kept by limit(1)
    n = len(calls)
    with packed_rows.limit(1):
      before = _verify(lambda *a, **k: packed.apply(model, pk, *a, **k), cfg, prompt, new)
    assert len(calls) == n
    _check(before, want, 1e-5)


def test_rows_of_a_batch_and_the_bound(calls):
  """Batched decoding (B rows of one token) takes the path while B * T <= MAX_ROWS; a longer
  prefill and one row do not."""
  model, params = _model("causal")
  pk = packed.pack(model, params, "float32")
  x = tokens(3, 4, 4)  # 16 rows
  want = model.apply({"params": params}, x)
  _check(jax.jit(lambda x: packed.apply(model, pk, x))(x), want, 1e-5)
  assert set(calls) == {16}
  calls.clear()
  x = tokens(4, 1, packed_rows.MAX_ROWS + 1)
  _check(jax.jit(lambda x: packed.apply(model, pk, x))(x), model.apply({"params": params}, x),
         1e-5)
  x = tokens(5, 1, 1)
  _check(jax.jit(lambda x: packed.apply(model, pk, x))(x), model.apply({"params": params}, x),
         1e-5)
  assert not calls
  with packed_rows.limit(4):
    assert packed_rows.applies(4) and not packed_rows.applies(5)
  assert packed_rows.max_rows() == packed_rows.MAX_ROWS


@pytest.mark.parametrize("fn", ["matmul_t", "reduction"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_matmul_t_equals_float64(dtype, fn):
  """`matmul_t` (the CPU kernel for float weights where it applies: 48 inputs) and XLA's
  `reduction` alone."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 48)).astype(np.float32)
  if dtype == "int8":
    w = rng.integers(-127, 128, (24, 48)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (24, 1)).astype(np.float32)
    w64 = w.astype(np.float64) * scale
  else:
    w = rng.standard_normal((24, 48)).astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                             else np.float32)
    scale, w64 = None, w.astype(np.float64)
  got = jax.jit(getattr(packed_rows, fn))(jnp.asarray(x), jnp.asarray(w),
                                          None if scale is None else jnp.asarray(scale))
  assert got.shape == (5, 24) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w64.T, rtol=1e-5,
                             atol=1e-5)


def test_bad_limit():
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="must be an int >= 1"), packed_rows.limit(bad):
      pass
