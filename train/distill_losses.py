"""Distillation losses: knowledge distillation on token distributions and generalized JSD.

Knowledge distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network")
trains a student on a teacher's next-token distributions softened by a temperature T; the
divergence is scaled by T^2 so its gradients keep their size as T changes. The generalized
Jensen-Shannon divergence of GKD (Agarwal et al., 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", Eq. 1) interpolates between the two KLs:

    JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

with P the teacher and Q the student; beta = 0 is taken as the forward KL(P || Q) (Hinton's,
mass-covering) and beta = 1 as the reverse KL(Q || P) (mode-seeking), the limits of JSD(beta)
divided by beta and 1 - beta (the convention of TRL's `GKDTrainer`).

`kd_loss` makes a loss with the trainer's signature: the teacher is another module, closed
over, whose params arrive through the trainer's `Frozen` combine as `params["teacher"]` (the
student's as `params["student"]`); its forward runs in the same jitted step under
`stop_gradient`. The loss is `alpha * T^2 * D + (1 - alpha) * CE` summed over the loss-mask
tokens. Evaluation also reports how well the student would draft for the teacher: the expected
acceptance of speculative sampling, sum_x min(p(x), q(x)) = 1 - TV(p, q) per token (Leviathan
et al., 2023), and the greedy agreement (argmax equal).

`stored_kd_loss` is the same loss from the teacher's top-k log-probs stored beside the data
(`train.distill_topk`, `kd.teacher=stored`): no teacher in the step. The divergence is then
between the teacher's distribution renormalized over its k likeliest tokens and the student's
renormalized over the same k ids (`topk_jsd`), at temperature T.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from train.objectives import cross_entropy_sums
from train.overrides import check_types


@dataclasses.dataclass(frozen=True)
class KDConfig:
  """The distillation loss.

  Attributes:
    alpha: weight of the divergence term; `1 - alpha` weighs cross entropy on the data tokens.
      0 trains on the tokens alone (data distillation, or the CE-only baseline).
    temperature: T, softens both distributions; the divergence is scaled by T^2.
    beta: generalized JSD interpolation: 0 forward KL(teacher || student), 1 reverse KL.
    lmbda: on-policy fraction of batches (GKD's lambda; `--method on-policy`).
    teacher: `live` (the teacher's forward in each step) or `stored` (its top-k log-probs
      stored beside the data, `generate.store_topk`; no teacher is loaded to train).
  """

  alpha: float = 0.5
  temperature: float = 1.0
  beta: float = 0.0
  lmbda: float = 1.0
  teacher: str = "live"

  def __post_init__(self):
    check_types(self)
    if self.teacher not in ("live", "stored"):
      raise ValueError(f"kd.teacher={self.teacher!r}: 'live' or 'stored'")
    if not 0 <= self.alpha <= 1 or not 0 <= self.beta <= 1 or not 0 <= self.lmbda <= 1:
      raise ValueError(f"kd: alpha={self.alpha}, beta={self.beta} and lmbda={self.lmbda} must "
                       "each be in [0, 1]")
    if self.temperature <= 0:
      raise ValueError(f"kd.temperature={self.temperature} must be > 0")


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(P || Q) over the last axis from (finite) log-probs."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 0.0,
                    temperature: float = 1.0) -> jax.Array:
  """The per-token generalized JSD between teacher P and student Q at temperature T, times T^2.

  Args:
    student_logits: `[..., V]`.
    teacher_logits: `[..., V]` (same shape).
    beta: a Python float in [0, 1]; 0 gives KL(P || Q), 1 gives KL(Q || P).
    temperature: T > 0.

  Returns:
    `[...]` float32 divergences.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} differ in shape (vocabularies must match)")
  t = float(temperature)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  if beta == 0:
    d = _kl(log_p, log_q)
  elif beta == 1:
    d = _kl(log_q, log_p)
  else:
    log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
    d = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
  return d * t * t


def agreement_sums(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array
                   ) -> dict[str, jax.Array]:
  """Sums over the mask of: KL(teacher || student) and KL(student || teacher) at T=1, the
  speculative-sampling acceptance probability sum_x min(p, q), and greedy agreement (argmax
  equal)."""
  mask = mask.astype(jnp.float32)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  accept = jnp.sum(jnp.exp(jnp.minimum(log_p, log_q)), axis=-1)
  same = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
  return {"kl_teacher": jnp.sum(_kl(log_p, log_q) * mask),
          "kl_student": jnp.sum(_kl(log_q, log_p) * mask),
          "accept": jnp.sum(accept * mask),
          "greedy_agree": jnp.sum(same.astype(jnp.float32) * mask)}


def _apply(model, params, batch, rng, train):
  return model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                     positions=batch["positions"], train=train,
                     rngs={"dropout": rng} if train else {})


def kd_loss(teacher_model, kd: KDConfig):
  """A trainer loss (`train.objectives.LossFn`) distilling `teacher_model` into the trained model.

  Args:
    teacher_model: the teacher module (same vocabulary as the student).
    kd: alpha, temperature, beta.

  Returns:
    `loss_fn(model, params, batch, rng, train) -> (loss_sum, tokens, sums)`, `params` being
    `{"student": ..., "teacher": ...}` and `batch` SFT's packed keys (`inputs`, `targets`,
    `loss_mask`, `segment_ids`, `positions`, each `[B, T]`). `sums` hold `correct`, `ce` and
    `divergence` (not with `alpha=0` in training: the teacher then runs in evaluation only),
    and in evaluation also `agreement_sums`.
  """
  def loss_fn(model, params, batch, rng, train):
    logits = _apply(model, params["student"], batch, rng, train)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, n, sums = cross_entropy_sums(logits, batch["targets"], mask)
    if train and kd.alpha == 0:  # Cross entropy only: the teacher is read in evaluation only.
      return ce, n, {**sums, "ce": ce}
    teacher = jax.lax.stop_gradient(_apply(teacher_model, params["teacher"], batch, rng, False))
    div = jnp.sum(generalized_jsd(logits, teacher, beta=kd.beta, temperature=kd.temperature)
                  * mask)
    loss = kd.alpha * div + (1 - kd.alpha) * ce
    sums = {**sums, "ce": ce, "divergence": div}
    if not train:
      sums.update(agreement_sums(logits, teacher, mask))
    return loss, n, sums

  return loss_fn


def topk_jsd(student_logits: jax.Array, topk_ids: jax.Array, topk_logprobs: jax.Array, *,
             beta: float = 0.0, temperature: float = 1.0) -> jax.Array:
  """`generalized_jsd` between the teacher's top-k distribution and the student's over the
  same ids, each renormalized over those k ids (at temperature T, times T^2).

  Args:
    student_logits: `[..., V]`.
    topk_ids: `[..., K]` int, the teacher's k likeliest ids.
    topk_logprobs: `[..., K]`, the teacher's log-probs of them (any temperature-1 log-probs or
      logits: renormalizing removes the constant).

  Returns:
    `[...]` float32 divergences.
  """
  picked = jnp.take_along_axis(student_logits.astype(jnp.float32), topk_ids, axis=-1)
  return generalized_jsd(picked, topk_logprobs, beta=beta, temperature=temperature)


def stored_kd_loss(kd: KDConfig):
  """`kd_loss` from stored top-k teacher log-probs (batch keys `topk_ids`, `topk_logprobs`
  `[B, T, K]`, `train.distill_topk.make_batches`); `params` are the student's own. A batch
  without them (another data set's) gets cross entropy alone, in evaluation."""
  def loss_fn(model, params, batch, rng, train):
    logits = _apply(model, params, batch, rng, train)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, n, sums = cross_entropy_sums(logits, batch["targets"], mask)
    sums = {**sums, "ce": ce}
    if "topk_ids" not in batch:
      if train:
        raise ValueError("kd.teacher=stored: a train batch without topk_ids")
      return ce, n, sums
    div = jnp.sum(topk_jsd(logits, batch["topk_ids"], batch["topk_logprobs"], beta=kd.beta,
                           temperature=kd.temperature) * mask)
    return kd.alpha * div + (1 - kd.alpha) * ce, n, {**sums, "divergence": div}

  return loss_fn
