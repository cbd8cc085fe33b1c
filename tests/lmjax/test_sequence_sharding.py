"""Context parallelism: a `sequence` mesh axis splits activations on their length, and attention
(the XLA reference and the flash kernel's shard_map) gathers keys and values over it. Every
figure is compared with the same computation on one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmjax
from infer import flash_attention as fa
from lmjax import sharding
from tests.lmjax.helpers import init, tiny, tokens
from tests.train.trainer_util import data_dirs  # noqa: F401  (a fixture)

TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_TOL = dict(rtol=1e-4, atol=2e-5)  # after Adam steps (it divides tiny grads by their size)
# Two packed rows whose segments cross the shard boundaries (every 16 tokens at sequence=4),
# and padding (segment 0) at the end of the second.
SEGMENTS = np.array([[1] * 10 + [2] * 34 + [3] * 20, [1] * 20 + [2] * 40 + [0] * 4], np.int32)


def _loss(model, params, x, seg):
  logits = model.apply({"params": params}, x, segment_ids=seg)
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]
  weight = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
  return jnp.sum(nll * weight) / jnp.sum(weight), logits


def _train(model, params, x, seg, steps, psh=None):
  """`steps` Adam steps (jitted with params split by `psh` over the mesh set, if given);
  returns (losses, first step's logits and grads, final params)."""
  tx = optax.adam(1e-2)

  def step(p, opt):
    (loss, logits), grads = jax.value_and_grad(lambda p: _loss(model, p, x, seg),
                                               has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, logits, grads

  if psh is None:
    step = jax.jit(step)
  else:
    params = jax.device_put(params, psh)
    step = jax.jit(step, in_shardings=(psh, None), out_shardings=(psh, None, None, None, psh))
  opt = tx.init(params)
  losses, first = [], None
  for _ in range(steps):
    params, opt, loss, logits, grads = step(params, opt)
    losses.append(float(loss))
    first = first or (logits, grads)
  return losses, first, params


def _close(tree_a, tree_b, **tol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol),
               tree_a, tree_b)


def _setup(attention="reference", **kw):
  cfg = tiny(vocab_size=96, attention=attention, max_len=64, **kw)
  x = tokens(0, 2, 64, 96)
  model, params = init(cfg, x)
  psh = sharding.param_shardings(lambda: model.init(jax.random.key(0), x)["params"],
                                 sharding.make_mesh(1, 2, 1, 4))
  return cfg, model, params, x, psh


@pytest.mark.parametrize("sizes", [(1, 2, 1, 4), (2, 1, 2, 2)])
def test_reference_training_equals_one_device(sizes):
  _, model, params, x, _ = _setup()
  seg = jnp.asarray(SEGMENTS)
  want = _train(model, params, x, seg, 3)
  mesh = sharding.make_mesh(*sizes)
  psh = sharding.param_shardings(lambda: model.init(jax.random.key(0), x)["params"], mesh)
  with jax.set_mesh(mesh):
    got = _train(model, params, x, seg, 3, psh)
  np.testing.assert_allclose(got[0], want[0], **TOL)  # three steps' losses
  np.testing.assert_allclose(got[1][0], want[1][0], **TOL)  # logits
  _close(got[1][1], want[1][1], **GRAD_TOL)  # grads
  _close(got[2], want[2], **PARAM_TOL)  # params after three steps
  # The logits come back split on length over `sequence` (and the embedding's width too).
  assert got[1][0].sharding.spec[1] == "sequence"
  emb = jax.device_put(params, psh)["embed"]["embedding"]
  assert emb.addressable_shards[0].data.shape == (96 // sizes[2], 32 // (sizes[1] * sizes[3]))


def test_flash_kernel_training_equals_one_device():
  _, model, params, x, psh = _setup("flash")
  seg = jnp.asarray(SEGMENTS)
  with fa.interpret_on_cpu():  # the Pallas kernel, interpreted on the CPU
    want = _train(model, params, x, seg, 2)
    with jax.set_mesh(sharding.make_mesh(1, 2, 1, 4)):
      got = _train(model, params, x, seg, 2, psh)
  np.testing.assert_allclose(got[0], want[0], **TOL)
  np.testing.assert_allclose(got[1][0], want[1][0], **TOL)
  _close(got[1][1], want[1][1], **GRAD_TOL)
  _close(got[2], want[2], **PARAM_TOL)


@pytest.mark.parametrize("attention", ["reference", "flash"])
def test_causal_mask_crosses_the_shard_boundary(attention):
  """A token on device 0 changes the logits of every later position of its segment on the other
  devices, and no earlier one: each device attends to the keys of the devices before it."""
  _, model, params, x, psh = _setup(attention, num_decoder_layers=1)
  y = x.at[:, 12].set((x[:, 12] + 1) % 96)  # device 0 of 4 holds positions 0..15
  with fa.interpret_on_cpu(), jax.set_mesh(sharding.make_mesh(1, 2, 1, 4)):
    f = jax.jit(lambda p, x: model.apply({"params": p}, x), in_shardings=(psh, None))
    a, b = np.asarray(f(params, x)), np.asarray(f(params, y))
  changed = np.abs(a - b).max(axis=(0, 2)) > 1e-6
  assert not changed[:12].any() and changed[12:].all()
  # ... and equal the one-device logits.
  with fa.interpret_on_cpu():
    np.testing.assert_allclose(a, model.apply({"params": params}, x), **TOL)


@pytest.mark.parametrize("family", ["masked", "seq2seq"])
def test_bidirectional_and_cross_attention_equal_one_device(family):
  cfg = tiny(family, vocab_size=96, max_len=64)
  x = tokens(0, 2, 64, 96)
  inputs = (x, x[:, :32]) if family == "seq2seq" else (x,)  # 64 encoder, 32 decoder tokens
  model, params = init(cfg, *inputs)
  with jax.set_mesh(sharding.make_mesh(1, 2, 1, 4)):
    got = jax.jit(lambda p, *i: model.apply({"params": p}, *i))(params, *inputs)
  assert got.sharding.spec[1] == "sequence"
  np.testing.assert_allclose(got, model.apply({"params": params}, *inputs), **TOL)


def test_activations_and_scores_are_split_on_length():
  cfg, model, params, x, psh = _setup()
  with jax.set_mesh(sharding.make_mesh(1, 2, 1, 4)):
    f = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True),
                in_shardings=(psh, None))
    _, inter = f(params, x)
    hlo = f.lower(params, x).compile().as_text()
  block = inter["intermediates"]["decoder"]["layers_0"]["__call__"][0][0]  # a block's output
  assert block.sharding.spec[:2] == ("fsdp", "sequence")
  assert block.addressable_shards[0].data.shape == (1, 16, 32)
  # The score matmuls are [B*N/fsdp, T/sequence, S] on each device (the keys gathered, the
  # queries not): no device computes a T x S block.
  scores = re.findall(r"f32\[(\d+),(\d+),(\d+)\]\{[\d,]+\} dot\(", hlo)
  assert ("4", "16", "64") in scores
  assert not [s for s in scores if s[1:] == ("64", "64")]
  assert "all-gather" in hlo


def test_bad_combinations_are_refused_before_compiling():
  cfg, model, params, x, _ = _setup()
  mesh = sharding.make_mesh(1, 2, 1, 4)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="query length 30 does not split "
                                         r"over the mesh's sequence axis \(mesh.sequence=4\)"):
    jax.eval_shape(lambda p: model.apply({"params": p}, x[:, :30]), params)
  # The kernel: each device's 24 queries (of 96) must be whole query blocks (here 32).
  blocks = fa.BlockSizes.uniform(32)
  with (jax.set_mesh(mesh), fa.interpret_on_cpu(),
        pytest.raises(ValueError, match="multiple of 128, or pass smaller block_sizes")):
    jax.eval_shape(lambda q: fa.mesh_flash_attention(q, q, q, causal=True, block_sizes=blocks),
                   jax.ShapeDtypeStruct((2, 96, 4, 8), jnp.float32))
  # A KV cache (decoding) on a sequence mesh.
  cache = lmjax.init_cache(cfg, 2, 64)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="KV cache .* sequence=4"):
    jax.eval_shape(lambda p: model.apply({"params": p}, x[:, :8], cache=cache), params)


def test_mesh_axes_and_rules():
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, sequence=-1)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
  with pytest.raises(ValueError, match="sequence=3 needs 6 devices; there are 8"):
    sharding.make_mesh(data=2, sequence=3)
  # Without a sequence axis (or with sequence=1) the specs are the three-axis ones.
  three = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)
  spec = jax.sharding.PartitionSpec(("fsdp", "sequence"), "tensor")
  want = jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding._fits(spec, (8, 8), three) == want
  assert sharding._fits(spec, (8, 8), sharding.make_mesh(2, 2, 2, 1)) == want


def test_pretrain_command_with_a_sequence_axis_equals_one_device(data_dirs, tmp_path,  # noqa: F811
                                                                 capsys):
  from tests.train.trainer_util import tiny_sets, train_losses
  from train import pretrain

  losses = {}
  for name, mesh in (("one", []), ("split", ["mesh.fsdp=2", "mesh.sequence=2"])):
    sets = tiny_sets(data_dirs, steps=3, extra=mesh)
    assert pretrain.main(["--config", "demo", "--workdir", str(tmp_path / name),
                          "--set", *sets]) == 0
    losses[name] = train_losses(tmp_path / name)
  assert "'sequence': 2" in capsys.readouterr().out  # the job's mesh line
  assert sorted(losses["split"]) == [1, 2, 3]
  np.testing.assert_allclose([losses["split"][s] for s in (1, 2, 3)],
                             [losses["one"][s] for s in (1, 2, 3)], rtol=1e-5)
