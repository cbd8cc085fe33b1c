"""The math of `train.rl_algos` / `train.rl_loss` against hand-derived vectors and float64 numpy
references: GRPO and RLOO advantages, GAE, the clipped policy and value losses, the KL
estimators, loss aggregation, and the "loss ~0 but gradient nonzero" property at ratio 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import random_params, tiny
from train import rl_algos, rl_loss
from train.rl_config import RLAlgoConfig


def test_rloo_on_one_to_six_with_groups_of_three():
  got = rl_algos.rloo_advantages(np.arange(1.0, 7.0), 3)
  # Group (1, 2, 3): 1 - 2.5, 2 - 2, 3 - 1.5; group (4, 5, 6) the same.
  np.testing.assert_allclose(got, [-1.5, 0, 1.5, -1.5, 0, 1.5], atol=1e-6)


def test_grpo_group_normalized_advantages_by_hand():
  r = np.arange(1.0, 7.0)
  s = np.sqrt(2 / 3)  # population std of (1, 2, 3)
  np.testing.assert_allclose(rl_algos.group_advantages(r, 3, eps=0.0),
                             [-1 / s, 0, 1 / s] * 2, rtol=1e-6)
  np.testing.assert_allclose(rl_algos.group_advantages(r, 3, "none"), [-1, 0, 1] * 2, atol=1e-6)
  np.testing.assert_allclose(rl_algos.group_advantages(r, 3, "batch", eps=0.0),
                             np.array([-1, 0, 1] * 2) / np.std(r), rtol=1e-6)
  # A group of equal rewards has no signal: zero advantages, not NaN.
  np.testing.assert_array_equal(rl_algos.group_advantages([2.0, 2.0], 2), [0.0, 0.0])


def _gae_float64(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards, np.float64)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    last = 0.0
    for k in reversed(range(len(idx))):
      t = idx[k]
      nv = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
      delta = rewards[b, t] + gamma * nv - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


def test_gae_matches_a_float64_loop():
  rng = np.random.default_rng(0)
  r, t = 5, 12
  mask = np.zeros((r, t))
  for b, (s, n) in enumerate([(2, 6), (0, 12), (5, 1), (3, 9), (7, 3)]):
    mask[b, s:s + n] = 1
  rewards = rng.normal(size=(r, t)) * mask
  values = rng.normal(size=(r, t)) * mask
  for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
    adv, ret = rl_algos.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _gae_float64(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_ppo_clipped_losses_match_float64_on_fixed_numbers():
  logp = np.log(np.array([[0.5, 0.2, 0.9, 0.3]]))
  old = np.log(np.array([[0.4, 0.4, 0.5, 0.3]]))
  adv = np.array([[1.0, -2.0, 0.5, 3.0]])
  ratio = np.exp(logp - old)  # 1.25, 0.5, 1.8, 1.0
  want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)  # -1.2, 1.6, -0.6, -3
  loss, got_ratio, clipped = rl_algos.clipped_policy_loss(logp, old, adv, 0.2)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(want, [[-1.2, 1.6, -0.6, -3.0]], rtol=1e-12)
  np.testing.assert_allclose(got_ratio, ratio, rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[1, 1, 1, 0]])
  # DAPO clip-higher: the upper bound moves to 1.28, so token 0 (ratio 1.25) is not clipped.
  loss_hi, _, clipped_hi = rl_algos.clipped_policy_loss(logp, old, adv, 0.2, 0.28)
  assert float(loss_hi[0, 0]) == pytest.approx(-1.25) and clipped_hi[0, 0] == 0
  v, v_old, ret = np.array([1.0, 0.0, 2.0]), np.array([0.5, 0.5, 2.0]), np.array([2.0, 0.0, 1.0])
  v_clip = v_old + np.clip(v - v_old, -0.2, 0.2)
  want_v = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
  np.testing.assert_allclose(rl_algos.clipped_value_loss(v, v_old, ret, 0.2), want_v, rtol=1e-6)


def test_kl_estimators_vanish_at_the_reference_and_match_their_formulas():
  lp = np.log(np.array([0.1, 0.5, 0.9]))
  for est in rl_algos.KL_ESTIMATORS:
    np.testing.assert_allclose(rl_algos.kl_estimate(lp, lp, est), 0.0, atol=1e-7)
  ref = np.log(np.array([0.2, 0.25, 0.9]))
  d = ref - lp
  np.testing.assert_allclose(rl_algos.kl_estimate(lp, ref, "k1"), -d, rtol=1e-6)
  np.testing.assert_allclose(rl_algos.kl_estimate(lp, ref, "k2"), d ** 2 / 2, rtol=1e-6)
  np.testing.assert_allclose(rl_algos.kl_estimate(lp, ref, "k3"), np.exp(d) - d - 1, rtol=1e-5)


def test_aggregations_against_numpy():
  x = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  cases = {"sequence-mean": (2.0 + 4.0, 2), "token-mean": (10 / 4, 1), "token-sum": (10, 4),
           "sequence-sum-norm": (6 / 8 + 4 / 8, 2)}
  for mode, (s, n) in cases.items():
    got = rl_algos.aggregate(x, m, mode, max_len=8)
    np.testing.assert_allclose([got[0], got[1]], [s, n], rtol=1e-6, err_msg=mode)


def test_loss_is_zero_at_ratio_one_with_centred_advantages_but_its_gradient_is_not():
  cfg = tiny()
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 8), jnp.int32),), 0)
  g, t = 4, 10
  tokens = jax.random.randint(jax.random.key(1), (2 * g, t), 1, 97)
  mask = np.zeros((2 * g, t), np.float32)
  mask[:, 4:] = 1
  adv = np.asarray(rl_algos.group_advantages(np.array([1., 0, 0, 1, 3, 1, 2, 0]), g))
  batch = {"tokens": tokens, "completion_mask": mask, "advantages": adv[:, None] * mask,
           "ref_log_probs": np.zeros((2 * g, t), np.float32),
           "sampler_log_probs": np.zeros((2 * g, t), np.float32)}
  loss_fn = rl_loss.make_loss(RLAlgoConfig(algorithm="grpo", num_generations=g, beta=0.0,
                                           loss_aggregation="sequence-mean"))

  def mean_loss(p):
    s, n, _ = loss_fn(model, {"policy": p, "reference": p}, batch, jax.random.key(0), False)
    return s / n

  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
  assert abs(float(loss)) < 1e-6
  norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads))))
  assert norm > 1e-3
