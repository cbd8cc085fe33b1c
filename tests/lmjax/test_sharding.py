"""Sharded equals unsharded; scan equals unrolled; remat changes nothing but memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import sharding
from tests.lmjax.helpers import init, tiny, tokens

TOL = dict(rtol=2e-5, atol=2e-5)


def loss_fn(model, params, x):
  logits = model.apply({"params": params}, x)
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_sharded_matches_single_device(family):
  assert jax.device_count() == 8
  cfg = tiny(family, vocab_size=96)
  x = tokens(0, 4, 16, 96)
  inputs = (x, x) if family == "seq2seq" else (x,)
  model, params = init(cfg, *inputs)
  if family == "seq2seq":
    def f(p, x):
      logits = model.apply({"params": p}, x, x)
      return jnp.mean(logits ** 2) * 1e-3, logits
  else:
    def f(p, x):
      return loss_fn(model, p, x), model.apply({"params": p}, x)
  (want_loss, want_logits), want_grads = jax.value_and_grad(f, has_aux=True)(params, x)

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  psh = sharding.param_shardings(lambda: model.init(jax.random.key(0), *inputs)["params"], mesh)
  sharded_params = jax.device_put(params, psh)
  xs = jax.device_put(x, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(f, has_aux=True), in_shardings=(psh, xs.sharding),
                   out_shardings=((None, None), psh))
    (loss, logits), grads = step(sharded_params, xs)
  np.testing.assert_allclose(loss, want_loss, **TOL)
  np.testing.assert_allclose(logits, want_logits, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads,
               want_grads)
  # The params really are split: e.g. the embedding [V, D] is split over tensor and fsdp.
  emb = sharded_params["embed"]["embedding"]
  assert emb.addressable_shards[0].data.shape == (96 // 2, 32 // 2)
  q = sharded_params["decoder"]["layers_0"]["self_attention"]["query"]["kernel"]
  assert q.addressable_shards[0].data.shape == (32 // 2, 4 // 2, 8)


def test_init_sharded_places_shards_directly():
  cfg = tiny(vocab_size=96)
  model = lmjax.CausalLM(cfg)
  x = jnp.zeros((1, 8), jnp.int32)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params, shardings = sharding.init_sharded(lambda: model.init(jax.random.key(0), x)["params"],
                                            mesh)
  want = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, want)
  wo = params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]  # [F, D] = (mlp, embed)
  assert wo.sharding == shardings["decoder"]["layers_1"]["mlp"]["wo"]["kernel"]
  assert wo.addressable_shards[0].data.shape == (64 // 2, 32 // 2)


def test_uneven_heads_fall_back_to_replicated():
  cfg = tiny(num_heads=3, num_kv_heads=3, model_dim=48, vocab_size=96)
  model = lmjax.CausalLM(cfg)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  psh = sharding.param_shardings(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"], mesh)
  spec = psh["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].spec
  assert tuple(spec) == ("fsdp", None, None)


def test_mesh_errors():
  with pytest.raises(ValueError, match="needs 16 devices; there are 8"):
    sharding.make_mesh(data=4, fsdp=2, tensor=2)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


def stack_layers(params, n):
  """Unrolled params (layers_0..n-1) -> the scanned layout (one `layers` with a leading L)."""
  dec = dict(params["decoder"])
  layers = [dec.pop(f"layers_{i}") for i in range(n)]
  dec["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "decoder": dec}


@pytest.fixture(scope="module")
def unrolled():
  """The unrolled model without remat: its params, loss and gradients (computed once)."""
  x = tokens(3, 2, 12)
  base_model, params = init(tiny(), x)
  want, want_g = jax.jit(jax.value_and_grad(lambda p: loss_fn(base_model, p, x)))(params)
  return x, params, want, want_g


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_scan_and_remat_match_unrolled(remat, unrolled):
  x, params, want, want_g = unrolled
  for scan in (False, True):
    cfg = tiny(scan_layers=scan, remat_policy=remat)
    model = lmjax.CausalLM(cfg)
    p = stack_layers(params, 2) if scan else params
    got, g = jax.jit(jax.value_and_grad(lambda p, m=model: loss_fn(m, p, x)))(p)
    np.testing.assert_allclose(got, want, **TOL)
    want_cmp = stack_layers(want_g, 2) if scan else want_g
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g,
                 want_cmp)
