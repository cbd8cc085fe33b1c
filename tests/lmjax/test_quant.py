"""lmjax.quant: formats against numpy, quantized models against dequantized ones, sharding,
QAT's straight-through estimator, GGUF blocks kept as they are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import quant
from lmjax.quant import qat
from tests.lmjax.helpers import random_params, tiny, tokens


def np_quant(w, fmt, group, axis):
  """float64 numpy reference of round-to-nearest absmax (minmax for uint4) quantization."""
  x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  g = x.reshape(x.shape[:-1] + (-1, group))
  if fmt == "uint4":
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    out = np.clip(np.round((g - lo) / s), 0, 15) * s + lo
  else:
    top, qmin = {"int8": (127, -127), "int4": (7, -8)}[fmt]
    s = np.abs(g).max(-1, keepdims=True) / top
    s = np.where(s > 0, s, 1.0)
    out = np.clip(np.round(g / s), qmin, top) * s
  return np.moveaxis(out.reshape(x.shape), -1, axis), s


@pytest.mark.parametrize("fmt,group,axis", [("int8", 48, 0), ("int8", 16, 1), ("int4", 16, 1),
                                            ("uint4", 8, 0), ("int4", 32, 2)])
def test_round_trip_matches_numpy_within_bound(fmt, group, axis):
  w = jax.random.normal(jax.random.key(0), (48, 32, 64)) * 0.1
  q = quant.quantize_array(w, fmt, group, axis)
  got = np.asarray(quant.dequantize(q), np.float64)
  ref, s = np_quant(w, fmt, group, axis)

  def per_group(x):
    return np.moveaxis(x, axis, -1).reshape(s.shape[:-1] + (group,))
  # float32 vs float64 division may round a near-tie the other way: one step, rarely.
  diff = per_group(np.abs(got - ref))
  assert np.mean(diff > 1e-6) < 2e-3 and np.all(diff <= s * 1.001 + 1e-7)
  err = per_group(np.abs(got - np.asarray(w, np.float64)))
  assert np.all(err <= s / 2 * 1.001 + 1e-7)  # half a step per group
  bits = (8 if fmt == "int8" else 4) + 32 / group * (2 if fmt == "uint4" else 1)
  assert q.nbytes * 8 == bits * w.size


def _tiny(scan=False, tie=False):
  cfg = tiny(scan_layers=scan, tie_embeddings=tie)
  model = lmjax.model_for(cfg)
  return cfg, model, random_params(model, (tokens(0, 1, 8),), 0)


def _np_dequantized(model, params, fmt, group):
  """The params with every quantized weight replaced by the numpy reference's values."""
  qp = quant.quantize(model, params, fmt, group)
  flat = jax.tree_util.tree_flatten_with_path(
      qp.tree, is_leaf=lambda x: isinstance(x, quant.QArray))[0]
  ref = {}
  for path, x in flat:
    if isinstance(x, quant.QArray):
      src = params
      for k in path:
        src = src[k.key]
      if x.shape == src.shape:
        ref[path] = jnp.asarray(np_quant(src, x.fmt, x.group, x.axis)[0], jnp.float32)
      else:  # scanned: one layer at a time
        ref[path] = jnp.stack([jnp.asarray(np_quant(s, x.fmt, x.group, x.axis)[0], jnp.float32)
                               for s in src])
  return jax.tree_util.tree_map_with_path(
      lambda p, v: ref.get(p, v), params), qp


@pytest.mark.parametrize("fmt,group,scan,tie", [("int8", None, False, False),
                                                ("int4", 8, True, True), ("nf4", 8, False, True)])
def test_quantized_forward_equals_dequantized_reference(fmt, group, scan, tie):
  cfg, model, params = _tiny(scan, tie)
  t = tokens(1, 2, 8)
  run = jax.jit(lambda p, t: model.apply({"params": p}, t))  # one compile, not one per op
  float_logits = run(params, t)
  got = jax.jit(lambda q, t: quant.apply(model, q, t))(quant.quantize(model, params, fmt, group),
                                                       t)
  if fmt != "nf4":  # the numpy reference covers int8/int4
    ref_params, _ = _np_dequantized(model, params, fmt, group)
    np.testing.assert_allclose(got, run(ref_params, t), atol=2e-3)
  else:
    ref = run(quant.dequantize_params(quant.quantize(model, params, fmt, group)), t)
    np.testing.assert_allclose(got, ref, atol=2e-5)
  err = float(jnp.abs(got - float_logits).max()) / float(jnp.abs(float_logits).max())
  assert err < {"int8": 0.02, "int4": 1.0, "nf4": 1.0}[fmt]  # unit-scale random weights
  assert err > 1e-4  # something was quantized


def test_generate_with_quantized_params():
  cfg, model, params = _tiny()
  qp = quant.quantize(model, params, "int8")
  prompts = [[5, 6, 7, 8]]
  got = infer.generate(model, qp, prompts, max_new_tokens=12)
  ref = infer.generate(model, quant.dequantize_params(qp), prompts, max_new_tokens=12)
  assert got.tokens == ref.tokens
  np.testing.assert_allclose(got.log_probs, ref.log_probs, atol=1e-4)


def test_sharded_equals_unsharded():
  cfg, model, params = _tiny()
  qp = quant.quantize(model, params, "int4", 8, double_quant=True)
  mesh = lmjax.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = quant.shard(model, qp, mesh)
  kernel = sharded.tree["decoder"]["layers_0"]["mlp"]["wi_gate"]["kernel"]
  assert kernel.qvalue.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(kernel.qvalue.sharding.device_set) == 8
  t = tokens(2, 4, 8)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, t: quant.apply(model, p, t))(sharded, t)
  np.testing.assert_allclose(got, quant.apply(model, qp, t), atol=1e-5)


@pytest.mark.parametrize("fmt,group", [("int8", -1), ("int4", 8)])
def test_qat_forward_is_ptq_and_gradient_passes_through(fmt, group):
  cfg, model, params = _tiny(tie=True)
  t = tokens(3, 2, 8)
  with qat.training(fmt, group):
    qat_logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, t)
  ptq = jax.jit(lambda q, t: quant.apply(model, q, t))(quant.quantize(model, params, fmt, group), t)
  np.testing.assert_allclose(qat_logits, ptq, atol=1e-5)
  # The estimator: d fake_quant(w) / dw = identity, so grads equal those of w itself.
  w = jax.random.normal(jax.random.key(4), (16, 24))
  c = jax.random.normal(jax.random.key(5), (16, 24))
  g = jax.grad(lambda w: jnp.sum(qat.fake_quant(w, fmt, 8, 0) * c))(w)
  np.testing.assert_array_equal(g, c)
  # Through the model: the gradient is the float model's gradient at the quantized weights.
  def loss(p):
    with qat.training(fmt, group):
      return jnp.mean(model.apply({"params": p}, t) ** 2)
  grads = jax.jit(jax.grad(loss))(params)  # compiled: eager grads run op by op
  deq = quant.dequantize_params(quant.quantize(model, params, fmt, group))
  ref = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, t) ** 2)))(deq)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bad_input():
  cfg, model, params = _tiny()
  with pytest.raises(ValueError, match="unknown quantization format 'int3'"):
    quant.quantize(model, params, "int3")
  with pytest.raises(ValueError, match="out/kernel: group size 16 does not divide"):
    quant.quantize(model, params, "int4", 16)
  with pytest.raises(ValueError, match="embeddings='fp8'"):
    quant.quantize(model, params, "int4", 8, embeddings="fp8")
  with pytest.raises(ValueError, match="unknown QAT format"):
    with qat.training("int2"):
      pass
  with pytest.raises(ValueError, match="quant='q5'"):
    lmjax.load_pretrained("smollm2-135m-instruct", quant="q5")


@pytest.mark.slow
def test_gguf_q4_1_kept_equals_dequantized_first():
  try:
    lmjax.convert.pretrained.resolve("smollm2-135m-instruct")
  except (FileNotFoundError, ValueError) as e:
    pytest.skip(f"SmolLM2 GGUF not installed: {e}")
  cfg, params, tok = lmjax.load_pretrained("smollm2-135m-instruct")
  cfg_k, kept, _ = lmjax.load_pretrained("smollm2-135m-instruct", quant="keep")
  leaves = jax.tree.leaves(kept.tree, is_leaf=lambda x: isinstance(x, quant.QArray))
  assert {x.fmt for x in leaves if isinstance(x, quant.QArray)} == {"uint4", "int8"}
  assert quant.nbytes(kept) < 0.22 * quant.nbytes(params)
  model = lmjax.model_for(cfg)
  t = jnp.asarray([tok.encode("The capital of France is Paris, and the capital of")])
  np.testing.assert_array_equal(quant.apply(model, kept, t), model.apply({"params": params}, t))
