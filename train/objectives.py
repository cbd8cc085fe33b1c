"""Losses: next-token prediction (causal LM), masked LM (BERT), and seq2seq / span corruption.

Every loss has the one signature the trainer calls,

    loss_fn(model, params, batch, rng, train) -> (loss_sum, num_tokens, metrics_sums)

and returns *sums* over the real (loss-mask) tokens of the batch, never means: the trainer adds
them over micro-batches (and devices) and divides once, so a padded or short micro-batch weighs
exactly its real tokens. `metrics_sums` values are sums over the same tokens (the trainer
reports each divided by `num_tokens`), e.g. `correct` for token accuracy. Later objectives (SFT,
reward models, distillation) plug in with the same signature.

Cross entropy is computed in float32 from the models' float32 logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
LossFn = Callable[[nn.Module, Any, Batch, jax.Array, bool],
                  tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """`(targets, loss_mask)` of a batch of any objective (LM or seq2seq keys)."""
  if "decoder_targets" in batch:
    return batch["decoder_targets"], batch["decoder_loss_mask"]
  return batch["targets"], batch["loss_mask"]


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """`(loss_sum, num_tokens, {"correct": ...})` of `[B, T, V]` logits against `[B, T]` ids."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask), {"correct": jnp.sum(correct * mask)}


def _rngs(rng: jax.Array, train: bool) -> dict[str, jax.Array]:
  return {"dropout": rng} if train else {}


def causal_lm_loss(model, params, batch: Batch, rng: jax.Array, train: bool):
  """Next-token cross entropy of a `CausalLM` (packed rows: attention stays in a segment)."""
  logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], train=train, rngs=_rngs(rng, train))
  return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])


def masked_lm_loss(model, params, batch: Batch, rng: jax.Array, train: bool):
  """Cross entropy of a `MaskedLM` on the masked positions only (Devlin et al., 2019)."""
  logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], train=train, rngs=_rngs(rng, train))
  return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])


def seq2seq_loss(model, params, batch: Batch, rng: jax.Array, train: bool):
  """Decoder cross entropy of a `Seq2SeqLM`, teacher-forced; also T5 span corruption
  (Raffel et al., 2020), whose batches have the same keys."""
  logits = model.apply(
      {"params": params}, batch["encoder_inputs"], batch["decoder_inputs"],
      encoder_segment_ids=batch["encoder_segment_ids"],
      encoder_positions=batch["encoder_positions"],
      decoder_segment_ids=batch["decoder_segment_ids"],
      decoder_positions=batch["decoder_positions"], train=train, rngs=_rngs(rng, train))
  return cross_entropy_sums(logits, batch["decoder_targets"], batch["decoder_loss_mask"])


LOSSES: dict[str, LossFn] = {
    "causal_lm": causal_lm_loss,
    "masked_lm": masked_lm_loss,
    "span_corruption": seq2seq_loss,
    "seq2seq": seq2seq_loss,
}

# The model family each objective trains (encoder layers, decoder layers).
FAMILIES = {"causal_lm": "decoder-only (CausalLM)", "masked_lm": "encoder-only (MaskedLM)",
            "span_corruption": "encoder-decoder (Seq2SeqLM)",
            "seq2seq": "encoder-decoder (Seq2SeqLM)"}


def loss_for(objective: str) -> LossFn:
  """The loss of a data objective (`train.data.OBJECTIVES`)."""
  if objective not in LOSSES:
    raise ValueError(f"no loss for objective {objective!r}; objectives are {sorted(LOSSES)}")
  return LOSSES[objective]


def check_model_fits(objective: str, num_encoder_layers: int, num_decoder_layers: int) -> None:
  """A clear error when the model family cannot train the objective."""
  enc, dec = num_encoder_layers > 0, num_decoder_layers > 0
  ok = {"causal_lm": dec and not enc, "masked_lm": enc and not dec,
        "span_corruption": enc and dec, "seq2seq": enc and dec}[objective]
  if not ok:
    raise ValueError(
        f"objective {objective!r} trains a {FAMILIES[objective]} model, but the model has "
        f"num_encoder_layers={num_encoder_layers} and num_decoder_layers={num_decoder_layers}")
