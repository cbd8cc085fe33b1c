"""The KD / generalized-JSD losses against float64 numpy references and hand-derived values
(uniform distributions, the beta edge cases, zero for identical distributions, temperature
scaling and its high-temperature limit), and `kd_loss`'s alpha mix against the same math on the
models' own logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import init, tiny, tokens
from train.distill_losses import KDConfig, agreement_sums, generalized_jsd, kd_loss, topk_jsd


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(lp, lq):
  return (np.exp(lp) * (lp - lq)).sum(-1)


def reference_jsd(student, teacher, beta, t):
  """GKD's Eq. 1 in float64: beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q; the
  forward / reverse KL at beta 0 / 1; times T^2."""
  lq, lp = _log_softmax(np.asarray(student) / t), _log_softmax(np.asarray(teacher) / t)
  if beta == 0:
    d = _kl(lp, lq)
  elif beta == 1:
    d = _kl(lq, lp)
  else:
    lm = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
    d = beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
  return d * t * t


def _logits(seed, shape=(3, 5, 11), scale=2.0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_generalized_jsd_matches_float64(beta, t):
  s, p = _logits(0), _logits(1)
  got = generalized_jsd(jnp.asarray(s), jnp.asarray(p), beta=beta, temperature=t)
  np.testing.assert_allclose(got, reference_jsd(s, p, beta, t), rtol=2e-5, atol=1e-6)


def test_edge_cases_by_hand():
  v = 8
  uniform = np.zeros((1, v), np.float32)
  peaked = np.array([[3.0] + [0.0] * (v - 1)], np.float32)
  # Identical distributions: zero for every beta and temperature.
  for beta in (0.0, 0.5, 1.0):
    for t in (1.0, 3.0):
      assert abs(float(generalized_jsd(peaked, peaked, beta=beta, temperature=t)[0])) < 1e-6
  # Uniform teacher P = 1/V: KL(P || Q) = -log V - mean(log q); reverse KL(Q || P) = log V - H(Q).
  q = np.exp(_log_softmax(peaked))[0]
  fwd = -np.log(v) - np.mean(np.log(q))
  rev = np.log(v) + np.sum(q * np.log(q))
  np.testing.assert_allclose(generalized_jsd(peaked, uniform, beta=0.0)[0], fwd, rtol=1e-5)
  np.testing.assert_allclose(generalized_jsd(peaked, uniform, beta=1.0)[0], rev, rtol=1e-5)
  # beta = 1/2 is the symmetric Jensen-Shannon divergence, at most log 2 (disjoint supports).
  a = generalized_jsd(peaked, uniform, beta=0.5)[0]
  b = generalized_jsd(uniform, peaked, beta=0.5)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  far = np.array([[40.0, 0.0]], np.float32)
  np.testing.assert_allclose(generalized_jsd(far, far[:, ::-1], beta=0.5)[0], np.log(2), rtol=1e-5)


def test_temperature_scaling_and_its_high_temperature_limit():
  s, p = _logits(2, (4, 7)), _logits(3, (4, 7))
  # T^2 x KL at T equals T^2 times the KL of the softened distributions.
  t = 4.0
  soft = reference_jsd(s / t, p / t, 0.0, 1.0)
  np.testing.assert_allclose(generalized_jsd(s, p, temperature=t), t * t * soft, rtol=1e-5)
  # Hinton et al. (2015), sec. 2.1: as T grows, T^2 KL(P||Q) -> sum_i (d_i - mean d)^2 / (2V)
  # with d = teacher - student logits (matching logits).
  d = p.astype(np.float64) - s
  limit = ((d - d.mean(-1, keepdims=True)) ** 2).sum(-1) / (2 * d.shape[-1])
  np.testing.assert_allclose(generalized_jsd(s, p, temperature=200.0), limit, rtol=2e-2)


def test_agreement_is_the_speculative_acceptance_probability():
  s, p = _logits(4), _logits(5)
  mask = np.ones(s.shape[:-1], np.float32)
  mask[0, :2] = 0
  got = agreement_sums(jnp.asarray(s), jnp.asarray(p), jnp.asarray(mask))
  ps, pt = np.exp(_log_softmax(s)), np.exp(_log_softmax(p))
  accept = np.minimum(ps, pt).sum(-1)  # = 1 - TV(p, q) (Leviathan et al., 2023)
  np.testing.assert_allclose(accept, 1 - 0.5 * np.abs(ps - pt).sum(-1), rtol=1e-9)
  np.testing.assert_allclose(got["accept"], (accept * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(got["kl_teacher"], (_kl(np.log(pt), np.log(ps)) * mask).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(got["kl_student"], (_kl(np.log(ps), np.log(pt)) * mask).sum(),
                             rtol=1e-5)
  agree = (s.argmax(-1) == p.argmax(-1)) * mask
  assert float(got["greedy_agree"]) == agree.sum()
  same = agreement_sums(jnp.asarray(s), jnp.asarray(s), jnp.asarray(mask))
  np.testing.assert_allclose(same["accept"], mask.sum(), rtol=1e-6)


@pytest.mark.parametrize("alpha,beta,t", [(0.5, 0.0, 2.0), (1.0, 0.5, 1.0), (0.0, 1.0, 1.0)])
def test_kd_loss_mixes_divergence_and_cross_entropy(alpha, beta, t):
  cfg = tiny()
  x = np.asarray(tokens(0, 2, 9))
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:],
           "loss_mask": np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.float32),
           "segment_ids": np.ones((2, 8), np.int32),
           "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1))}
  student_model, student = init(cfg, jnp.asarray(batch["inputs"]), seed=0)
  teacher_model, teacher = init(cfg.replace(num_decoder_layers=3), jnp.asarray(batch["inputs"]),
                                seed=1)
  loss_fn = kd_loss(teacher_model, KDConfig(alpha=alpha, beta=beta, temperature=t))
  params = {"student": student, "teacher": teacher}
  loss, n, sums = loss_fn(student_model, params, batch, jax.random.key(0), False)
  ls = np.asarray(student_model.apply({"params": student}, batch["inputs"]), np.float64)
  lt = np.asarray(teacher_model.apply({"params": teacher}, batch["inputs"]), np.float64)
  m = batch["loss_mask"]
  ce = -(np.take_along_axis(_log_softmax(ls), batch["targets"][..., None], -1)[..., 0] * m).sum()
  div = (reference_jsd(ls, lt, beta, t) * m).sum()
  assert float(n) == m.sum()
  np.testing.assert_allclose(float(sums["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(sums["divergence"]), div, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(loss), alpha * div + (1 - alpha) * ce, rtol=1e-5)
  # The teacher gets no gradient (stop_gradient): its params are read, never trained.
  g = jax.grad(lambda p: loss_fn(student_model, p, batch, jax.random.key(0), True)[0])(params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["teacher"]))
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["student"]))


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="alpha"):
    KDConfig(alpha=1.5)
  with pytest.raises(ValueError, match="temperature"):
    KDConfig(temperature=0.0)
  with pytest.raises(ValueError, match="differ in shape"):
    generalized_jsd(jnp.zeros((2, 5)), jnp.zeros((2, 6)))
  assert lmjax.TransformerConfig.from_preset("smollm2-student").vocab_size == 49152


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_stored_topk_loss_is_the_live_loss_restricted_to_the_same_topk(beta, t):
  s, z = _logits(4, (2, 5, 23)), _logits(5, (2, 5, 23))
  k = 6
  # What the store keeps: the teacher's k likeliest ids and their log-probs (temperature 1).
  lp = _log_softmax(z)
  ids = np.argsort(-lp, -1)[..., :k]
  stored = np.take_along_axis(lp, ids, -1).astype(np.float32)
  got = topk_jsd(jnp.asarray(s), jnp.asarray(ids), jnp.asarray(stored), beta=beta, temperature=t)
  # The live teacher's logits and the student's, both restricted to those ids (float64): the
  # divergence of the two renormalized k-way distributions.
  pick = lambda x: np.take_along_axis(np.asarray(x, np.float64), ids, -1)  # noqa: E731
  np.testing.assert_allclose(got, reference_jsd(pick(s), pick(z), beta, t), rtol=2e-5,
                             atol=1e-6)
  # With k = V the stored loss is the live one.
  ids = np.argsort(-lp, -1)
  full = topk_jsd(jnp.asarray(s), jnp.asarray(ids), jnp.asarray(np.take_along_axis(lp, ids, -1)),
                  beta=beta, temperature=t)
  np.testing.assert_allclose(full, reference_jsd(s, z, beta, t), rtol=2e-5, atol=1e-6)
