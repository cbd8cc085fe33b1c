"""Sampler statistics against exact float64 distributions, truncation sets, greedy, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import sampling

N = 40_000  # draws per distribution
LOGITS = np.array([2.0, 1.2, 0.9, 0.1, -0.4, -1.5, -3.0, 0.5])


def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  e[~np.isfinite(x)] = 0.0
  return e / e.sum()


def _ref_keep(logits, temperature=1.0, top_k=None, top_p=None):
  """The documented rule in float64: scale, top-k, nucleus over what top-k kept (ties: lower id
  first), renormalize. Returns the exact distribution over the vocabulary."""
  x = np.asarray(logits, np.float64) / (temperature or 1.0)
  order = sorted(range(len(x)), key=lambda i: (-x[i], i))
  kept = order if top_k is None else order[:top_k]
  if top_p is not None and top_p < 1.0:
    probs = _softmax64(x[kept])
    mass, nucleus = 0.0, []
    for i, q in zip(kept, probs):
      nucleus.append(i)
      mass += q
      if mass >= top_p:
        break
    kept = nucleus
  out = np.full_like(x, -np.inf)
  out[kept] = x[kept]
  return _softmax64(out)


def _draw(sampler, logits, n=N, seed=0):
  tiled = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  toks = np.asarray(sampler.sample(tiled, jax.random.key(seed)))
  return np.bincount(toks, minlength=len(logits)) / n


def _chi2(freq, probs, n=N):
  """Pearson's statistic of the observed counts against `probs` (cells with p = 0 must be 0)."""
  assert (freq[probs == 0] == 0).all(), "drew a token of probability 0"
  p = probs[probs > 0]
  return float(np.sum((freq[probs > 0] * n - n * p) ** 2 / (n * p)))


# chi-square 0.999 quantile for 7 degrees of freedom is 24.3; a correct sampler stays below it
# for this fixed seed, and each "wrong" distribution below lands far above it.
CRIT = 24.3


@pytest.mark.parametrize("sampler,t", [(sampling.Random(), 1.0), (sampling.Temperature(0.5), 0.5),
                                       (sampling.Temperature(1.7), 1.7)])
def test_random_and_temperature_match_softmax(sampler, t):
  freq = _draw(sampler, LOGITS)
  assert _chi2(freq, _softmax64(LOGITS / t)) < CRIT
  wrong_t = 1.0 if t != 1.0 else 0.8
  assert _chi2(freq, _softmax64(LOGITS / wrong_t)) > 10 * CRIT


def test_per_row_temperatures():
  temps = [0.5, 2.0]
  s = sampling.Temperature(temps * (N // 2))
  tiled = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (N, len(LOGITS)))
  toks = np.asarray(s.sample(tiled, jax.random.key(1)))
  for r, t in enumerate(temps):
    freq = np.bincount(toks[r::2], minlength=len(LOGITS)) / (N // 2)
    assert _chi2(freq, _softmax64(LOGITS / t), N // 2) < CRIT
    assert _chi2(freq, _softmax64(LOGITS / temps[1 - r]), N // 2) > 10 * CRIT


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k(k):
  freq = _draw(sampling.TopK(k, temperature=0.8), LOGITS, seed=k)
  top = np.argsort(-LOGITS)[:k]
  assert set(np.nonzero(freq)[0]) <= set(top)  # never outside the k largest
  want = _ref_keep(LOGITS, 0.8, top_k=k)
  if k > 1:
    assert _chi2(freq, want) < CRIT
    assert _chi2(freq, _softmax64(LOGITS / 0.8)) > 10 * CRIT  # the untruncated distribution
  else:
    assert freq[top[0]] == 1.0


def test_top_k_ties_keep_lower_ids():
  logits = jnp.asarray([[3.0, 1.0, 1.0, 1.0, 0.0]], jnp.float32)
  kept = sampling.filter_logits(logits, jnp.ones(1), jnp.asarray([2]), jnp.ones(1),
                                use_top_k=True, use_top_p=False)
  assert np.isfinite(np.asarray(kept[0])).tolist() == [True, True, False, False, False]


def _nucleus_mask(logits, p, top_k=None):
  b = 1
  k = jnp.asarray([len(logits) if top_k is None else top_k])
  out = sampling.filter_logits(jnp.asarray([logits], jnp.float32), jnp.ones(b), k,
                               jnp.asarray([p], jnp.float32), use_top_k=top_k is not None,
                               use_top_p=True)
  return np.isfinite(np.asarray(out[0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = np.log(probs)
  for p, want in [(0.3, {1}), (0.45, {1}), (0.55, {1, 3}), (0.7, {1, 3}), (0.9, {1, 3, 2}),
                  (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
    got = set(np.nonzero(_nucleus_mask(logits, p))[0])
    ref = set(np.nonzero(_ref_keep(logits, top_p=p))[0])
    assert got == want == ref, (p, got, want, ref)
  # Ties: 0.4 then three tokens of 0.2; p = 0.5 needs one of them: the lowest id.
  tied = np.log(np.array([0.2, 0.4, 0.2, 0.2]))
  assert _nucleus_mask(tied, 0.5).tolist() == [True, True, False, False]
  assert _nucleus_mask(tied, 0.7).tolist() == [True, True, True, False]
  # p = 1 keeps even a token of negligible probability.
  tiny = np.array([10.0, -20.0, 0.0])
  assert _nucleus_mask(tiny, 1.0).all()


def test_top_p_and_composition_match_exact_distribution():
  for sampler, kw in [(sampling.TopP(0.8), dict(top_p=0.8)),
                      (sampling.TopP(0.6, temperature=1.5), dict(temperature=1.5, top_p=0.6)),
                      (sampling.Sampler(temperature=0.7, top_k=4, top_p=0.9),
                       dict(temperature=0.7, top_k=4, top_p=0.9))]:
    freq = _draw(sampler, LOGITS, seed=11)
    want = _ref_keep(LOGITS, **kw)
    assert _chi2(freq, want) < CRIT, kw
    assert _chi2(freq, _softmax64(LOGITS / kw.get("temperature", 1.0))) > 10 * CRIT


def test_per_row_top_k_and_top_p():
  s = sampling.Sampler(temperature=[1.0, 1.0, 0.9], top_k=[2, 8, 8], top_p=[1.0, 0.5, 0.75])
  logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (3, 8))
  kept = sampling.filter_logits(logits, **s.arrays(3), use_top_k=True, use_top_p=True)
  for r, kw in enumerate([dict(top_k=2), dict(top_p=0.5), dict(temperature=0.9, top_p=0.75)]):
    np.testing.assert_array_equal(np.isfinite(np.asarray(kept[r])), _ref_keep(LOGITS, **kw) > 0)


def test_temperature_zero_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (64, 50))
  best = np.asarray(jnp.argmax(logits, axis=-1))
  for s in [sampling.Greedy(), sampling.Temperature(0.0), sampling.TopK(5, temperature=0.0),
            sampling.Sampler(temperature=0.0, top_k=3, top_p=0.5)]:
    np.testing.assert_array_equal(s.sample(logits, jax.random.key(1)), best)
  mixed = sampling.Temperature([0.0, 1.0] * 32)
  got = np.asarray(mixed.sample(logits, jax.random.key(2)))
  np.testing.assert_array_equal(got[::2], best[::2])
  assert (got[1::2] != best[1::2]).any()
  # Ties: the lowest id.
  tie = jnp.asarray([[0.0, 2.0, 2.0]])
  assert int(sampling.Greedy().sample(tie, jax.random.key(0))[0]) == 1


def test_per_row_keys_make_rows_independent():
  logits = jax.random.normal(jax.random.key(3), (6, 40))
  keys = jax.random.split(jax.random.key(4), 6)
  s = sampling.TopP(0.9, temperature=1.3)
  full = np.asarray(s.sample(logits, keys))
  for r in range(6):
    assert int(s.sample(logits[r:r + 1], keys[r:r + 1])[0]) == full[r]


def test_bad_settings_raise():
  for make, match in [(lambda: sampling.TopP(0.0), "top_p"), (lambda: sampling.TopP(1.01), "top_p"),
                      (lambda: sampling.TopP([0.5, -0.1]), "top_p"),
                      (lambda: sampling.TopK(0), "top_k"), (lambda: sampling.TopK(2.5), "top_k"),
                      (lambda: sampling.Temperature(-1.0), "temperature"),
                      (lambda: sampling.Sampler(temperature=float("nan")), "temperature"),
                      (lambda: sampling.Sampler(top_k=[1, 2], top_p=[0.5, 0.6, 0.7]), "disagree"),
                      (lambda: sampling.from_name("nucleus"), "unknown sampler"),
                      (lambda: sampling.from_name("greedy", temperature=0.5), "does not take")]:
    with pytest.raises(ValueError, match=match):
      make().sample(jnp.zeros((3, 8)), jax.random.key(0))
  with pytest.raises(ValueError, match="vocabulary size"):
    sampling.TopK(9).sample(jnp.zeros((2, 8)), jax.random.key(0))
  with pytest.raises(ValueError, match="batch"):
    sampling.Temperature([1.0, 2.0]).sample(jnp.zeros((3, 8)), jax.random.key(0))


def test_from_name_and_hashable():
  assert sampling.from_name("top-p", top_p=0.9, temperature=0.8) == sampling.TopP(0.9, 0.8)
  assert sampling.from_name("top-k", top_k=5).resolve() == sampling.Sampler(top_k=5)
  assert sampling.from_name("top-p", top_k=5, top_p=0.5).resolve() == sampling.Sampler(
      top_k=5, top_p=0.5)
  assert hash(sampling.TopP([0.5, 0.9])) == hash(sampling.TopP((0.5, 0.9)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_argmax_equals_numpy(dtype):
  """The two-reduction argmax against numpy's: ties (the first wins), NaN (the first NaN
  wins), all -inf, 3-D logits."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 4, 97)).astype(np.float32)
  x[0, :, 5] = x[0, :, 70] = 9.0  # a tie
  x[1, 0, 40], x[1, 0, 60], x[1, 1, 3] = np.nan, np.nan, np.nan
  x[2, 0] = -np.inf
  x[3] = np.round(x[3])  # many ties at the maximum
  x = x.astype(dtype)
  got = np.asarray(jax.jit(sampling.argmax)(jnp.asarray(x)))
  want = np.argmax(np.asarray(x, np.float32), axis=-1)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  assert got[0, 0] == 5 and got[1, 0] == 40 and got[2, 0] == 0
