"""The math of policy-gradient RLHF: advantages, GAE, KL estimators, clipped losses, aggregation.

Pure functions on arrays (jnp, so they trace inside the jitted step; numpy arrays work too):

- GRPO's group-normalized advantages (Shao et al., 2024, "DeepSeekMath"): each of a prompt's G
  samples gets `(r - mean_group) / (std_group + eps)` (or only centred, or scaled by the batch's
  std: Dr. GRPO, Liu et al., 2025, drops the division);
- RLOO's leave-one-out baseline (Ahmadian et al., 2024, "Back to Basics"; Kool et al., 2019):
  `r_i - mean_{j != i} r_j` within a group;
- GAE (Schulman et al., 2016) over the completion tokens, for PPO (Schulman et al., 2017;
  Ouyang et al., 2022), with returns `A + V`;
- the KL estimators of Schulman (2020, "Approximating KL divergence"), per token, from the
  policy's and reference's log-probs: k1 = log(pi/ref), k2 = (log(pi/ref))^2 / 2,
  k3 = ref/pi - log(ref/pi) - 1 (unbiased, always >= 0; GRPO's choice);
- the clipped surrogate objective with per-token importance ratios (never a sequence-level
  ratio), DAPO's asymmetric clip (Yu et al., 2025), and PPO's clipped value loss;
- loss aggregation, returned as the trainer's `(sum, count)` pair: "sequence-mean" (each
  sequence's token mean, averaged over sequences: GRPO), "token-mean" (the token mean of each
  micro-batch), "token-sum" (DAPO's token-level loss: every token of the step's batch weighs the
  same) and "sequence-sum-norm" (Dr. GRPO: each sequence's token sum / the max completion
  length).

Shapes: R rows (= prompts x G), T token positions; token arrays are aligned with the tokens
(entry t scores token t), masks are 1 on the completion tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("sequence-mean", "token-mean", "token-sum", "sequence-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
REWARD_SCALES = ("group", "batch", "none")


def group_advantages(rewards, group: int, scale: str = "group", eps: float = 1e-4):
  """GRPO advantages `[R]` of rewards `[R]` in groups of `group` consecutive rows.

  `scale`: "group" divides by each group's std (population std, as the paper), "batch" by
  the std of the whole batch, "none" only centres (Dr. GRPO).
  """
  r = jnp.asarray(rewards, jnp.float32).reshape(-1, group)
  centred = r - r.mean(axis=1, keepdims=True)
  if scale == "group":
    centred = centred / (r.std(axis=1, keepdims=True) + eps)
  elif scale == "batch":
    centred = centred / (r.std() + eps)
  elif scale != "none":
    raise ValueError(f"scale={scale!r}; allowed: {REWARD_SCALES}")
  return centred.reshape(-1)


def rloo_advantages(rewards, group: int):
  """RLOO advantages `[R]`: each reward minus the mean of the other `group - 1` of its group."""
  r = jnp.asarray(rewards, jnp.float32).reshape(-1, group)
  baseline = (r.sum(axis=1, keepdims=True) - r) / (group - 1)
  return (r - baseline).reshape(-1)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """`x` normalized to unit variance (and zero mean) over the masked entries."""
  mask = jnp.asarray(mask, jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / n
  var = (jnp.square(x - mean) * mask).sum() / n
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return out if shift_mean else out + mean


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
  """Generalized advantage estimation over each row's masked tokens.

  Args:
    rewards: `[R, T]` per-token rewards (0 off the mask).
    values: `[R, T]` value estimates V(state before token t).
    mask: `[R, T]` 1 on the completion tokens (one contiguous run per row).
    gamma, lam: discount and GAE lambda.

  Returns:
    `(advantages, returns)` `[R, T]`, 0 off the mask; returns = advantages + values.
  """
  mask = jnp.asarray(mask, jnp.float32)
  rewards = jnp.asarray(rewards, jnp.float32) * mask
  values = jnp.asarray(values, jnp.float32) * mask
  nxt_v = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  nxt_m = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  delta = rewards + gamma * nxt_v * nxt_m - values

  def body(carry, x):
    d, m_next = x
    a = d + gamma * lam * m_next * carry
    return a, a

  _, adv = jax.lax.scan(body, jnp.zeros(rewards.shape[0], jnp.float32),
                        (delta.T, nxt_m.T), reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def kl_estimate(log_probs, ref_log_probs, estimator: str = "k3"):
  """Per-token estimate of KL(pi || ref) from log pi and log ref of the sampled tokens."""
  d = ref_log_probs - log_probs  # log(ref / pi)
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  if estimator == "k3":
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"kl estimator {estimator!r}; allowed: {KL_ESTIMATORS}")


def clipped_policy_loss(log_probs, old_log_probs, advantages, eps_low: float = 0.2,
                        eps_high: float | None = None):
  """PPO's clipped surrogate, per token: `-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)`.

  Args:
    log_probs: `[R, T]` the learner's log-probs (differentiated).
    old_log_probs: `[R, T]` those of the policy that sampled (not differentiated).
    advantages: `[R, T]` per-token advantages (a sequence's advantage on each of its tokens).
    eps_low, eps_high: the clip range (eps_high None: = eps_low; DAPO's clip-higher > eps_low).

  Returns:
    `(loss, ratio, clipped)` `[R, T]` each; `clipped` is 1 where the clipped term was taken.
  """
  eps_high = eps_low if eps_high is None else eps_high
  ratio = jnp.exp(log_probs - jax.lax.stop_gradient(old_log_probs))
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  return loss, ratio, (clipped < unclipped).astype(jnp.float32)


def clipped_value_loss(values, old_values, returns, clip: float | None = 0.2):
  """PPO's value loss per token: `max((V - R)^2, (V_old + clip(V - V_old) - R)^2) / 2`."""
  loss = jnp.square(values - returns)
  if clip is not None:
    v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = jnp.maximum(loss, jnp.square(v_clip - returns))
  return 0.5 * loss


def aggregate(per_token, mask, mode: str, max_len: int | None = None):
  """`(loss_sum, count)` of a `[R, T]` per-token loss under `mode` (module docstring); the
  trainer divides the sum of `loss_sum` by the sum of `count` over micro-batches once."""
  mask = jnp.asarray(mask, jnp.float32)
  masked = per_token * mask
  tokens = mask.sum(axis=1)
  if mode == "token-sum":
    return masked.sum(), mask.sum()
  if mode == "token-mean":
    return masked.sum() / jnp.maximum(mask.sum(), 1.0), jnp.float32(1.0)
  has = (tokens > 0).astype(jnp.float32)
  if mode == "sequence-mean":
    return (masked.sum(axis=1) / jnp.maximum(tokens, 1.0)).sum(), has.sum()
  if mode == "sequence-sum-norm":
    norm = float(max_len or per_token.shape[1])
    return (masked.sum(axis=1) / norm).sum(), has.sum()
  raise ValueError(f"loss aggregation {mode!r}; allowed: {AGGREGATIONS}")
