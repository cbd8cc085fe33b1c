"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, and a weight-decay mask.

AdamW (Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101) decouples weight decay
from the adaptive update; the learning rate warms up linearly (Goyal et al., 2017) and then
follows a half cosine (Loshchilov & Hutter, 2017, SGDR) down to a floor. Gradients are clipped
by their global norm (Pascanu et al., 2013) before the update.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimizerConfig

# Leaves that are decayed: matmul kernels and embedding tables. Norm scales, biases (and
# anything else, e.g. MaskedLM's head bias) are not (as in BERT, GPT-2 and most since).
DECAYED_NAMES = ("kernel", "embedding")


def _leaf_name(path) -> str:
  """The last dict key of a path (a boxed `nn.Partitioned` leaf adds a `.value` after it)."""
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: by name (`DECAYED_NAMES`) and at least 2-D.

  The test by name keeps scanned layers right (a norm scale stacked over layers is 2-D), and
  the ndim test keeps a 1-D "kernel" of some future layer undecayed.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _leaf_name(path) in DECAYED_NAMES and len(x.shape) >= 2, params)


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to the floor at
  `decay_steps` (default `total_steps`), constant after."""
  decay = config.decay_steps or total_steps
  warmup = min(config.warmup_steps, max(decay - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(decay, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with the schedule and the decay mask.

  The mask is a function of the params tree, so it works on raw trees and on the boxed
  (`nn.Partitioned`) trees used to find the optimizer state's shardings.
  """
  def mask(params):
    return decay_mask(params)

  chain = []
  if config.clip_norm is not None:
    chain.append(optax.clip_by_global_norm(config.clip_norm))
  chain.append(optax.adamw(
      learning_rate=learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
      eps=config.eps, weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*chain)
