"""`remat_policy` is applied: each layer is one `jax.checkpoint` with the configured policy, and
what the backward pass keeps (the residuals `jax.vjp` holds) is what that policy saves; the
gradients do not change."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import find_eqns, tiny, tokens

B, T, F = 2, 12, 48
N, K = 4, 2  # tiny(): 4 query heads over 2 kv heads, so attention scores are [B, K, 2T, S]
POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _params(scan: bool):
  """One set of params for every policy (remat does not change the tree)."""
  model = lmjax.model_for(tiny(scan_layers=scan, ffn_dim=F))
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens(0, B, T))["params"])


def _model(policy: str, scan: bool):
  cfg = tiny(remat_policy=policy, scan_layers=scan, ffn_dim=F)
  model, x = lmjax.model_for(cfg), tokens(0, B, T)
  return cfg, (lambda p: model.apply({"params": p}, x)), _params(scan)


def _remats(jaxpr) -> list:
  """The remat (`jax.checkpoint`) equations of a jaxpr, nested ones included."""
  return find_eqns(jaxpr, ("remat2", "checkpoint"))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["none", *POLICIES])
def test_each_layer_is_checkpointed_with_the_policy(policy, scan):
  cfg, fn, params = _model(policy, scan)
  remats = _remats(jax.make_jaxpr(fn)(params).jaxpr)
  if policy == "none":
    assert not remats
    return
  # One per layer unrolled; one in the scanned body (which runs once per layer).
  assert len(remats) == (1 if scan else cfg.num_decoder_layers)
  for eqn in remats:
    assert eqn.params["policy"] == POLICIES[policy]
    assert eqn.params["prevent_cse"] is (not scan)


def _residuals(policy: str, scan: bool) -> dict[str, int]:
  """Activations the backward pass keeps, by kind: attention scores or probabilities
  `[.., 2T, S]`, feed-forward hidden `[.., T, F]` or `[.., B*T, F]`, and all bytes."""
  _, fn, params = _model(policy, scan)
  leaves = jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(fn, p)[1], params))
  return {
      "attention": sum(1 for x in leaves if x.ndim >= 4 and x.shape[-2:] == (N // K * T, T)),
      "hidden": sum(1 for x in leaves if x.shape[-2:] in ((T, F), (B * T, F))),
      "bytes": sum(x.size * x.dtype.itemsize for x in leaves),
  }


@pytest.mark.parametrize("scan", [False, True])
def test_the_backward_pass_keeps_what_the_policy_saves(scan):
  got = {policy: _residuals(policy, scan) for policy in ["none", *POLICIES]}
  none, full, dots, no_batch = (got[p] for p in ["none", "full", "dots", "dots_no_batch"])
  # No remat: the softmax probabilities and the feed-forward activations are kept.
  assert none["attention"] > 0 and none["hidden"] > 0
  # Full remat keeps each layer's input only: both are recomputed.
  assert full["attention"] == 0 and full["hidden"] == 0
  # dots keeps matmul outputs (the scores, a batched matmul; the feed-forward projections),
  # not what elementwise ops make of them (the probabilities, the activation).
  assert 0 < dots["attention"] < none["attention"] and 0 < dots["hidden"] < none["hidden"]
  # dots_no_batch keeps the projections (no batch dims), not the batched attention matmuls.
  assert no_batch["attention"] == 0 and no_batch["hidden"] == dots["hidden"]
  assert full["bytes"] < no_batch["bytes"] < dots["bytes"] < none["bytes"]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_remat_does_not_change_the_gradients(policy):
  def grads(policy):
    _, fn, params = _model(policy, False)
    return jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(fn(p)))))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(policy), grads("none"))
