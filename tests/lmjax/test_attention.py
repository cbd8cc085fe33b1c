"""The reference attention against float64 numpy; GQA against MHA; rotary is relative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax.attention_ops import SegmentIds, reference_attention
from lmjax.embeddings import apply_rotary
from tests.lmjax.helpers import init, tiny, tokens


def numpy_attention(q, k, v, causal, qseg=None, kvseg=None):
  """Loops over heads in float64, the most literal form of softmax(q k^T / sqrt(H)) v."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      kv = ni // (n // kh)
      sc = q[bi, :, ni] @ k[bi, :, kv].T / np.sqrt(h)
      ok = np.ones((t, s), bool)
      if causal:
        ok &= np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)
      if qseg is not None:
        ok &= np.asarray(qseg)[bi][:, None] == np.asarray(kvseg)[bi][None, :]
      sc = np.where(ok, sc, -np.inf)
      for ti in range(t):
        if not ok[ti].any():
          continue
        p = np.exp(sc[ti] - sc[ti].max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, :, kv]
  return out


@pytest.mark.parametrize("t,s,n,kh,causal,seg", [
    (8, 8, 4, 4, True, False), (5, 9, 4, 2, True, False), (7, 7, 6, 1, False, True),
    (6, 6, 4, 2, True, True), (3, 11, 2, 2, False, False)])
def test_reference_attention_matches_float64(t, s, n, kh, causal, seg):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (2, t, n, 8))
  k = jax.random.normal(ks[1], (2, s, kh, 8))
  v = jax.random.normal(ks[2], (2, s, kh, 8))
  segs = None
  qseg = kvseg = None
  if seg:
    qseg = jax.random.randint(ks[3], (2, t), 0, 3)
    kvseg = jax.random.randint(ks[4], (2, s), 0, 3)
    segs = SegmentIds(qseg, kvseg)
  got = reference_attention(q, k, v, causal=causal, segment_ids=segs)
  want = numpy_attention(q, k, v, causal, qseg, kvseg)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_fully_masked_rows_are_zero_not_nan():
  q = jnp.ones((1, 2, 2, 4))
  k = v = jnp.ones((1, 3, 2, 4))
  segs = SegmentIds(jnp.array([[1, 5]]), jnp.array([[1, 1, 2]]))
  out = reference_attention(q, k, v, segment_ids=segs)
  grads = jax.grad(lambda q, k, v: reference_attention(q, k, v, segment_ids=segs).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  assert np.all(np.asarray(out[0, 1]) == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_attention_shape_errors():
  with pytest.raises(ValueError, match="multiple of kv heads"):
    reference_attention(jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)))
  with pytest.raises(ValueError, match="head dim"):
    reference_attention(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 8)), jnp.ones((1, 2, 2, 8)))
  with pytest.raises(ValueError, match="needs T == S"):
    reference_attention(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)),
                        segment_ids=jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="not registered"):
    lmjax.get_attention("flashy")


def test_gqa_equals_mha_with_repeated_kv_weights():
  """A GQA model equals an MHA model whose k/v kernels repeat each kv head for its group."""
  gqa_cfg = tiny(num_heads=4, num_kv_heads=2)
  mha_cfg = tiny(num_heads=4, num_kv_heads=4)
  x = tokens(1, 2, 10)
  gqa, p = init(gqa_cfg, x)
  mha = lmjax.CausalLM(mha_cfg)

  def repeat(tree):
    out = {}
    for key, val in tree.items():
      if isinstance(val, dict):
        out[key] = repeat(val)
      else:
        out[key] = val
    for name in ("key", "value"):
      if name in out and "kernel" in out[name]:
        out[name] = {"kernel": jnp.repeat(out[name]["kernel"], 2, axis=-2)}
    return out

  np.testing.assert_allclose(mha.apply({"params": repeat(p)}, x), gqa.apply({"params": p}, x),
                             rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  ks = jax.random.split(jax.random.key(3), 2)
  q = jax.random.normal(ks[0], (1, 1, 1, 16))
  k = jax.random.normal(ks[1], (1, 1, 1, 16))

  def score(pq, pk):
    rq = apply_rotary(q, jnp.array([[pq]]), 10_000.0)
    rk = apply_rotary(k, jnp.array([[pk]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  base = score(5, 2)
  for shift in (1, 17, 300):
    np.testing.assert_allclose(score(5 + shift, 2 + shift), base, rtol=1e-4)
  assert abs(score(5, 3) - base) > 1e-3  # and it does depend on the offset
  # The rotation keeps norms (a rotation in each (i, i + H/2) plane).
  np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.array([[9]]), 1e4)),
                             jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("path", ["xla", "kernel"])
def test_cached_attention_reads_only_filled_parts(t, path, monkeypatch):
  """A 512-slot cache (4 parts of 128): rows filled to different lengths, `used` at and
  around part boundaries, against attention over every slot; stale values beyond `used`
  (a rolled-back draft's) change nothing. Through XLA (parts) and through the CPU kernel
  (`lmjax.quant.cpu_attention`, where it is available)."""
  from lmjax.attention_ops import cached_attention, grouped_attention
  from lmjax.quant import cpu_attention
  if path == "xla":
    monkeypatch.setattr(cpu_attention, "applies", lambda q, k: False)
  elif not cpu_attention.available():
    pytest.skip("the CPU attention kernel needs an x86-64 Linux CPU with AVX2")
  rng = np.random.default_rng(t)
  b, s, n, kh, h = 3, 512, 4, 2, 16
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, kh, s, h)) * 3, jnp.float32) for _ in range(2))
  f = jax.jit(lambda *a: cached_attention(*a))  # a fresh trace (not the other path's)
  assert (cpu_attention.TARGETS[jnp.dtype(jnp.float32)][1] in f.lower(
      q, k, v, jnp.ones((b, t, s), bool), jnp.int32(1)).as_text()) == (path == "kernel")
  for used in (u for u in (1, 127, 128, 129, 300, 384, 385, 512) if u >= t):
    lengths = jnp.asarray([max(0, used - t - 40), max(0, used - t - 7), used - t])
    slot = lengths[:, None] + jnp.arange(t)[None, :]
    j = jnp.arange(s)[None, None, :]
    mask = (j <= slot[:, :, None]) & (j < (lengths + t)[:, None, None])
    want = np.asarray(grouped_attention(q, k, v, mask, "BKSH"), np.float64)
    got = f(q, k, v, mask, jnp.int32(used))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)  # |v| ~3: float32 sums
  # A part too few would drop the last row's newest slots: the outputs move.
  short = f(q, k, v, mask, jnp.int32(384))
  assert np.abs(np.asarray(short) - want).max() > 1e-3


@pytest.mark.parametrize("head_dim", [8, 16])
def test_decode_over_a_long_cache_equals_recompute(head_dim):
  """A tiny model's cached step of 3 tokens after a 290-token prefill in a 512-slot cache
  against the whole sequence without a cache: head dim 8 through XLA's parts, 16 through the
  CPU kernel where it is available."""
  from lmjax.quant import cpu_attention
  cfg = tiny("causal", max_len=512, model_dim=4 * head_dim)
  model = lmjax.model_for(cfg)
  x = tokens(3, 1, 293)
  params = init(cfg, x)[1]
  cache = lmjax.init_cache(cfg, 1, 512)
  _, cache = model.apply({"params": params}, x[:, :290], cache=cache, prefill=True)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  kernel = cpu_attention.TARGETS[jnp.dtype(jnp.float32)][1] in step.lower(
      params, x[:, 290:], cache).as_text()
  assert kernel == (head_dim == 16 and cpu_attention.available())
  got, _ = step(params, x[:, 290:], cache)
  want = model.apply({"params": params}, x)[:, 290:]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
