"""Preference losses: Bradley-Terry for reward models, DPO and IPO for policies.

- Bradley-Terry (Bradley & Terry, 1952; as in Ouyang et al., 2022):
  `-log sigmoid(r_chosen - r_rejected - margin)` (the optional margin as in TRL's
  `RewardTrainer`, Touvron et al., 2023).
- DPO (Rafailov et al., 2023), `sigmoid`: with `z = beta * ((log pi(y_c) - log ref(y_c)) -
  (log pi(y_r) - log ref(y_r)))`, `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)` (eps: label
  smoothing, the conservative DPO of Mitchell, 2023). At policy == reference the loss is log 2
  and its gradient pushes the chosen response up and the rejected one down.
- IPO (Azar et al., 2023): `(h - 1 / (2 beta))^2`, `h` the same log-ratio difference of the
  responses' per-token *mean* log-probs (as TRL computes it).

All have the trainer's signature `loss_fn(model, params, batch, rng, train) -> (loss_sum,
num_pairs, metrics_sums)` (sums over pairs, never means). Batches come from
`train.preference_data`: packed rows where each pair is two segments, chosen then rejected;
per token `pair` (the pair's slot in its row, 0 = padding), `sign` (+1 chosen, -1 rejected),
`last` (1 at each sequence's last token), `margin`, and for DPO `targets` and `loss_mask`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from train.objectives import Batch, _rngs

LOSS_TYPES = ("sigmoid", "ipo")


def pair_sums(x: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """`(chosen, rejected)` `[B, M]`: per pair slot, the sum of `x` `[B, T]` over its chosen and
  its rejected tokens (`M = T // 2 + 1` slots, slot 0 unused: padding)."""
  b, t = x.shape
  m = t // 2 + 1
  ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * m + batch["pair"]).reshape(-1)
  sign = batch["sign"]

  def sums(mask):
    s = jax.ops.segment_sum(jnp.where(mask, x, 0.0).reshape(-1), ids, num_segments=b * m)
    return s.reshape(b, m)
  return sums(sign > 0), sums(sign < 0)


def _valid(batch: Batch) -> jax.Array:
  """`[B, M]` 1.0 for the slots holding a pair (its chosen sequence's last token is there)."""
  ones = batch["last"].astype(jnp.float32)
  c, r = pair_sums(ones, batch)
  return ((c > 0) & (r > 0)).astype(jnp.float32)


def _pair_metrics(loss: jax.Array, chosen: jax.Array, rejected: jax.Array, valid: jax.Array,
                  prefix: str = ""):
  n = jnp.sum(valid)
  diff = chosen - rejected
  return jnp.sum(loss * valid), n, {
      "correct": jnp.sum((diff > 0) * valid),
      f"{prefix}margin": jnp.sum(diff * valid),
      f"{prefix}chosen": jnp.sum(chosen * valid),
      f"{prefix}rejected": jnp.sum(rejected * valid)}


def bradley_terry_loss(model, params, batch: Batch, rng: jax.Array, train: bool):
  """Bradley-Terry loss of a `lmjax.RewardModel` on packed preference pairs.

  Returns:
    `(loss_sum, num_pairs, {"correct", "margin", "chosen", "rejected"})`: sums over pairs
    (`margin` of `r_chosen - r_rejected`, `chosen`/`rejected` of the rewards).
  """
  values = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], train=train, per_token=True,
                       rngs=_rngs(rng, train))
  last = batch["last"] > 0
  chosen, rejected = pair_sums(jnp.where(last, values, 0.0), batch)
  margin, _ = pair_sums(jnp.where(last, batch["margin"], 0.0), batch)
  valid = _valid(batch)
  loss = jax.nn.softplus(-(chosen - rejected - margin))  # = -log sigmoid(...)
  return _pair_metrics(loss, chosen, rejected, valid)


def token_log_probs(model, params, batch: Batch, rng: jax.Array, train: bool) -> jax.Array:
  """`[B, T]` float32 log-prob of each target token (the model's log-softmax at it)."""
  logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], train=train, rngs=_rngs(rng, train))
  return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          batch["targets"])


def sequence_log_probs(model, params, batch: Batch, rng: jax.Array, train: bool,
                       mean: bool = False, logp: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """`(chosen, rejected)` `[B, M]`: each response's summed (or `mean`) token log-prob (of the
  model, or of given per-token `logp` `[B, T]`)."""
  if logp is None:
    logp = token_log_probs(model, params, batch, rng, train)
  mask = batch["loss_mask"].astype(jnp.float32)
  chosen, rejected = pair_sums(logp * mask, batch)
  if mean:
    nc, nr = pair_sums(mask, batch)
    chosen, rejected = chosen / jnp.maximum(nc, 1.0), rejected / jnp.maximum(nr, 1.0)
  return chosen, rejected


def preference_loss(pc, pr, rc, rr, *, beta: float, loss_type: str,
                    label_smoothing: float = 0.0) -> jax.Array:
  """Per-pair DPO/IPO loss from policy (`pc`, `pr`) and reference (`rc`, `rr`) log-probs."""
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    return ((1.0 - label_smoothing) * jax.nn.softplus(-beta * h)
            + label_smoothing * jax.nn.softplus(beta * h))
  if loss_type == "ipo":
    return (h - 1.0 / (2.0 * beta)) ** 2
  raise ValueError(f"unknown preference loss_type {loss_type!r}; types: {list(LOSS_TYPES)}")


def dpo_loss(*, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             precomputed: bool = False):
  """The DPO/IPO loss function; its `params` are `{"policy": ..., "reference": ...}` (the
  reference frozen, `train.trainer.Frozen`), or with `precomputed` the policy's alone and the
  reference's per-token log-probs in the batch (`ref_logp` `[B, T]`, `train.dpo`).

  Returns:
    `loss_fn` giving `(loss_sum, num_pairs, {"correct", "margin", "chosen", "rejected",
    "logp_chosen", "logp_rejected"})`: `chosen`/`rejected` the implicit rewards
    `beta * (log pi - log ref)`, `correct` where the chosen one is higher.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown preference loss_type {loss_type!r}; types: {list(LOSS_TYPES)}")
  if beta <= 0:
    raise ValueError(f"beta={beta} must be > 0")
  if not 0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
  return functools.partial(_dpo, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                           precomputed=precomputed)


def _dpo(model, params, batch: Batch, rng: jax.Array, train: bool, *, beta, loss_type,
         label_smoothing, precomputed=False):
  mean = loss_type == "ipo"
  if precomputed:
    pc, pr = sequence_log_probs(model, params, batch, rng, train, mean)
    rc, rr = sequence_log_probs(None, None, batch, rng, False, mean, logp=batch["ref_logp"])
  else:
    pc, pr = sequence_log_probs(model, params["policy"], batch, rng, train, mean)
    rc, rr = sequence_log_probs(model, jax.lax.stop_gradient(params["reference"]), batch, rng,
                                False, mean)
  loss = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing)
  valid = _valid(batch)
  chosen = jax.lax.stop_gradient(beta * (pc - rc))
  rejected = jax.lax.stop_gradient(beta * (pr - rr))
  loss_sum, n, sums = _pair_metrics(loss, chosen, rejected, valid)
  sums.update(logp_chosen=jnp.sum(jax.lax.stop_gradient(pc) * valid),
              logp_rejected=jnp.sum(jax.lax.stop_gradient(pr) * valid))
  return loss_sum, n, sums
