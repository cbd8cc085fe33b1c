"""Frozen params in the one trainer: the loss reads them, the optimizer never sees them, the
step's gradient is that of the trainable part alone (checked against `jax.grad` of the same loss
written by hand), and they are sharded by their own logical names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmjax
from tests.lmjax.helpers import tiny, tokens
from train.objectives import cross_entropy_sums
from train.trainer import Frozen, Trainer


def _batch(b=8, t=16):
  x = np.asarray(tokens(1, b, t + 1))
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": np.ones((b, t), np.float32)}


def _pull_loss(model, params, batch, rng, train):
  """Cross entropy of the policy plus a pull toward the frozen reference's logits."""
  del rng, train
  logits = model.apply({"params": params["policy"]}, batch["inputs"])
  ref = model.apply({"params": params["reference"]}, batch["inputs"])
  loss, n, sums = cross_entropy_sums(logits, batch["targets"], batch["mask"])
  pull = jnp.sum(jnp.square(logits - ref)) / logits.shape[-1]
  return loss + pull, n, sums


def _setup(mesh):
  cfg = tiny()
  model = lmjax.CausalLM(cfg)
  x = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
  frozen = Frozen(boxed, lambda t, f: {"policy": t, "reference": f})
  trainer = Trainer(model, _pull_loss, optax.sgd(0.5), mesh, init_inputs=(x,), global_batch=8,
                    frozen=frozen)
  reference = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)["params"]))(jax.random.key(7))
  return model, trainer, reference


def test_the_step_trains_only_the_trainable_part_and_reads_the_frozen_one():
  mesh = lmjax.make_mesh(2, 2, 2)
  model, trainer, reference = _setup(mesh)
  with pytest.raises(ValueError, match="set_frozen"):
    trainer.train_step(trainer.init_state(), 0, _batch())
  trainer.set_frozen(reference)
  state = trainer.init_state()
  start = jax.device_get(state.params)
  batch = _batch()

  def by_hand(p):  # The same loss, per token, with the reference closed over.
    loss, n, _ = _pull_loss(model, {"policy": p, "reference": reference}, batch, None, True)
    return loss / n

  expected = jax.tree.map(lambda p, g: p - 0.5 * g, start, jax.grad(by_hand)(start))
  state, metrics = trainer.train_step(state, 0, batch)
  got = jax.device_get(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, expected)
  # The frozen params are unchanged, and sharded by their logical names (the embedding's vocab
  # axis over tensor, as the trainable copy is).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen_params), reference)
  emb = trainer.frozen_params["embed"]["embedding"]
  assert emb.sharding == state.params["embed"]["embedding"].sharding
  assert not emb.sharding.is_fully_replicated
  # Evaluation reads them too: with policy == reference the pull term vanishes.
  trainer.set_frozen(got)
  ev = trainer.evaluate(state.params, iter([batch]))
  plain = cross_entropy_sums(model.apply({"params": got}, batch["inputs"]), batch["targets"],
                             batch["mask"])
  assert ev["loss"] == pytest.approx(float(plain[0] / plain[1]), rel=1e-5)


def test_frozen_params_of_another_shape_are_refused():
  model, trainer, reference = _setup(lmjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  bad = jax.tree.map(lambda x: x, reference)
  bad["embed"]["embedding"] = np.zeros((5, 32), np.float32)
  with pytest.raises(ValueError, match="wrong shape.*embedding"):
    trainer.set_frozen(bad)
