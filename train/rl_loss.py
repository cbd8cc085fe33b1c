"""The RL learner: the policy-gradient loss the one trainer steps on, the scoring pass that
fixes a rollout's reference / old log-probs and values, and PPO's value head.

The loss has the trainer's signature `(model, params, batch, rng, train) -> (loss_sum, count,
metrics_sums)`; `params` is `{"policy": lm, "reference": frozen}` (plus `"value"` for PPO). It
recomputes the policy's per-token log-probs (the sampler's are only compared, `mismatch`), forms
per-token importance ratios against the rollout policy's (`old_log_probs`, recomputed by
`score` when a rollout is used for several updates; otherwise the current log-probs with the
gradient stopped, so the ratio is exactly 1), and adds, per algorithm:

- GRPO / RLOO: the clipped surrogate with the sequence advantage on each of its tokens, plus
  `beta * KL` (k3 by default) to the reference, aggregated by `rl.loss_aggregation`;
- PPO: the clipped surrogate with GAE advantages (the k1 KL is already in the reward), plus
  `vf_coef` times the clipped value loss of a value head on the policy's last hidden states.

`lmjax.heads` (a reward model with per-token values) did not exist when this was written, so
PPO's critic is the small `ValueHead` here: one linear layer on the policy trunk's final
(normed) hidden states, trained with it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.transformer import Stack
from train import rl_algos
from train.rl_config import RLAlgoConfig
from train.rollout import token_log_probs


class ValueHead(nn.Module):
  """A scalar value per position from hidden states `[B, T, D]` -> `[B, T]` (float32)."""

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    d = hidden.shape[-1]
    w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("embed", None)), (d, 1), jnp.float32)
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                   (1,), jnp.float32)
    return jnp.einsum("BTD,DO->BTO", hidden.astype(jnp.float32), w)[..., 0] + b[0]


def forward(model, policy, tokens: jax.Array, *, hidden: bool = False, train: bool = False,
            rngs=None):
  """`logits [B, T, V]`, and with `hidden` also the trunk's final hidden states `[B, T, D]`."""
  if not hidden:
    return model.apply({"params": policy}, tokens, train=train, rngs=rngs or {}), None
  logits, inter = model.apply(
      {"params": policy}, tokens, train=train, rngs=rngs or {},
      capture_intermediates=lambda m, _: isinstance(m, Stack), mutable=["intermediates"])
  (h, _), = inter["intermediates"]["decoder"]["__call__"]
  return logits, h


def values_of(value_params, h: jax.Array) -> jax.Array:
  """`[B, T]` values aligned with the tokens: entry t is V(tokens before t) (entry 0 is 0)."""
  v = ValueHead().apply({"params": value_params}, h)[:, :-1]
  return jnp.concatenate([jnp.zeros_like(v[:, :1]), v], axis=1)


def make_loss(rl: RLAlgoConfig):
  """The trainer's loss function for `rl` (module docstring)."""
  ppo = rl.algorithm == "ppo"
  recompute_old = rl.updates_per_rollout > 1

  def loss_fn(model, params, batch, rng, train):
    tokens = batch["tokens"]
    mask = batch["completion_mask"].astype(jnp.float32)
    rngs = {"dropout": rng} if train else {}
    logits, h = forward(model, params["policy"], tokens, hidden=ppo, train=train, rngs=rngs)
    logp, ent = token_log_probs(logits, tokens, rl.temperature)
    old = batch["old_log_probs"] if recompute_old else jax.lax.stop_gradient(logp)
    pg, ratio, clipped = rl_algos.clipped_policy_loss(logp, old, batch["advantages"],
                                                      rl.epsilon, rl.epsilon_high)
    kl = rl_algos.kl_estimate(logp, batch["ref_log_probs"], rl.kl)
    per_token = pg
    sums = {}
    if not ppo and rl.beta > 0:
      per_token = per_token + rl.beta * kl
    if ppo:
      v = values_of(params["value"], h)
      vl = rl_algos.clipped_value_loss(v, batch["old_values"], batch["returns"],
                                       rl.cliprange_value)
      per_token = per_token + rl.vf_coef * vl
      sums["value_loss"] = jnp.sum(vl * mask)
    loss_sum, count = rl_algos.aggregate(per_token, mask, rl.loss_aggregation,
                                         rl.max_new_tokens)

    def tsum(x):
      return jnp.sum(jax.lax.stop_gradient(x) * mask)
    sums.update(
        completion_tokens=jnp.sum(mask), policy_loss=tsum(pg), kl=tsum(kl), entropy=tsum(ent),
        clip_fraction=tsum(clipped), ratio=tsum(ratio),
        mismatch=tsum(jnp.abs(logp - batch["sampler_log_probs"])))
    return loss_sum, count, sums

  return loss_fn


def make_score(model, rl: RLAlgoConfig):
  """`score(policy, reference, value, tokens) -> dict` of `[B, T]` arrays, jitted: the
  reference's log-probs, and (several updates per rollout) the rollout policy's own, and
  (PPO) its values. Runs on the sharded params as they are."""
  ppo = rl.algorithm == "ppo"

  def score(policy, reference, value, tokens):
    out = {}
    ref_logits, _ = forward(model, reference, tokens)
    out["ref_log_probs"], _ = token_log_probs(ref_logits, tokens, rl.temperature)
    if ppo or rl.updates_per_rollout > 1:
      logits, h = forward(model, policy, tokens, hidden=ppo)
      out["old_log_probs"], _ = token_log_probs(logits, tokens, rl.temperature)
      if ppo:
        out["old_values"] = values_of(value, h)
    return out

  return jax.jit(score)
