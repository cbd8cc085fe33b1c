"""Packed int4 (`lmjax.packed.pack(model, params, "int4")`): two codes per byte, output-major,
a float32 scale per group of inputs. Its forward (one row, a few rows, many rows) and greedy
decoding against the model run on int4-dequantized weights computed in float64 numpy."""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import packed, quant
from lmjax.packed import _kernels
from lmjax.quant import packed_int4
from tests.lmjax.helpers import random_params, tiny, tokens

GROUP = 8  # tiny(): model_dim 32, head_dim 8, ffn 64


def _model(scan, tie, **kw):
  cfg = tiny(scan_layers=scan, tie_embeddings=tie, **kw)
  model = lmjax.model_for(cfg)
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def _np_int4(w, axis, group, symmetric):
  """float64 4-bit round to nearest per `group` along `axis`: symmetric (absmax / 7, codes
  -8..7) or with an offset (the group's minimum, (max - min) / 15, codes 0..15)."""
  x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
  if symmetric:
    s = np.abs(g).max(-1, keepdims=True) / 7
    s = np.where(s > 0, s, 1.0)
    deq = np.clip(np.round(g / s), -8, 7) * s
  else:
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    deq = np.clip(np.round((g - lo) / s), 0, 15) * s + lo
  return np.moveaxis(deq.reshape(x.shape), -1, axis)


def _dequantized_reference(model, params, group, symmetric=False):
  """The float params with every projection and an untied head int4-rounded (groups along
  each kernel's last contracted axis), the embedding int8-rounded per row."""
  flat = tu.flatten_dict(params)
  for path, (k, ndim) in _kernels(model, params).items():
    w = np.asarray(flat[path])
    lead = w.ndim - ndim
    flat[path] = jnp.asarray(_np_int4(w, lead + k - 1, group, symmetric).astype(np.float32))
  for path in list(flat):
    if path[-2:] == ("embed", "embedding"):
      e = np.asarray(flat[path], np.float64)  # int8, one absmax scale per row
      s = np.abs(e).max(1, keepdims=True) / 127
      s = np.where(s > 0, s, 1.0)
      flat[path] = jnp.asarray((np.clip(np.round(e / s), -127, 127) * s).astype(np.float32))
  return tu.unflatten_dict(flat)


@pytest.mark.parametrize("scan,tie,kw,symmetric", [(False, True, {}, False),
                                                   (True, False, {"qkv_bias": True}, True)])
def test_packed_int4_forward_equals_dequantized_model(scan, tie, kw, symmetric):
  model, params = _model(scan, tie, **kw)
  pk = packed_int4.pack(model, params, group_size=GROUP, symmetric=symmetric)
  ref = _dequantized_reference(model, params, GROUP, symmetric)
  # One row (the streamed nibble halves), a few rows (lmjax.packed_rows), many rows (a matmul).
  for b, t in ((1, 1), (1, 5), (3, 8)):
    x = tokens(1, b, t)
    want = np.asarray(model.apply({"params": ref}, x), np.float64)
    got = np.asarray(packed.apply(model, pk, x), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Layout: two codes per byte, output-major, a scale per group of GROUP inputs.
  for path, *_ in pk.packed:
    node = pk.tree
    for name in path[:-1]:
      node = node[name]
    codes, scale = node[path[-1]], node[path[-1] + "_scale"]
    assert codes.dtype == jnp.uint8 and scale.dtype == jnp.float32
    assert codes.shape[-1] * 2 == scale.shape[-2] * GROUP and scale.shape[-1] == 2
  emb = pk.tree["embed"]["embedding"]
  assert emb.dtype == jnp.int8 and emb.shape == (97, 32)
  # unpack gives the dequantized weights back in the model's layout.
  back = packed.unpack(pk)
  layer = "layers" if scan else "layers_0"
  np.testing.assert_allclose(np.asarray(back["decoder"][layer]["mlp"]["wo"]["kernel"]),
                             np.asarray(ref["decoder"][layer]["mlp"]["wo"]["kernel"]),
                             atol=1e-6)


def test_packed_int4_decodes_like_the_dequantized_model():
  model, params = _model(False, True)
  pk = packed_int4.pack(model, params, group_size=GROUP)
  ref = _dequantized_reference(model, params, GROUP)
  prompts = [[5, 6, 7, 8, 9]]
  want = infer.generate(model, ref, prompts, max_new_tokens=12, ignore_eos=True)
  got = infer.generate(model, pk, prompts, max_new_tokens=12, ignore_eos=True)
  assert got.tokens == want.tokens and len(set(want.tokens[0])) > 1
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-4)
  # Packing the (symmetric) int4 QuantParams of the same group size gives the same arrays.
  again = packed.pack(model, quant.quantize(model, params, "int4", GROUP, embeddings=False),
                      "int4")
  sym = packed_int4.pack(model, params, group_size=GROUP, symmetric=True)
  for a, b in zip(jax.tree.leaves(again.tree), jax.tree.leaves(sym.tree), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input():
  model, params = _model(False, True)
  with pytest.raises(ValueError, match="needs int4 or uint4 weights"):
    packed.pack(model, quant.quantize(model, params, "nf4", 8), "int4")
  with pytest.raises(ValueError, match="group size 12 does not divide"):
    packed_int4.pack(model, params, group_size=12)
  with pytest.raises(ValueError, match="unknown packed format 'int2'"):
    packed.pack(model, params, "int2")
