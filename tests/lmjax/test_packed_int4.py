"""Packed int4 and NF4 (`lmjax.packed.pack(model, params, "int4" | "nf4")`): two codes per byte,
output-major, a float32 scale (and offset) per group of inputs. Its forward (one row, a few
rows, many rows) and greedy decoding against the model run on int4- / NF4-dequantized weights
computed in float64 numpy (NF4 with QLoRA's table written out here)."""

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
# QLoRA (Dettmers et al., 2023), Appendix E: the NF4 data type's 16 values.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _model(scan, tie, **kw):
  cfg = tiny(scan_layers=scan, tie_embeddings=tie, **kw)
  model = lmjax.model_for(cfg)
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def _np_int4(w, axis, group, fmt):
  """float64 4-bit round to nearest per `group` along `axis`: "int4" symmetric (absmax / 7,
  codes -8..7), "uint4" with an offset (the group's minimum, (max - min) / 15, codes 0..15),
  "nf4" the nearest NF4 level to w / absmax."""
  x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
  if fmt == "nf4":
    s = np.abs(g).max(-1, keepdims=True)
    s = np.where(s > 0, s, 1.0)
    deq = NF4[np.abs((g / s)[..., None] - NF4).argmin(-1)] * s
  elif fmt == "int4":
    s = np.abs(g).max(-1, keepdims=True) / 7
    s = np.where(s > 0, s, 1.0)
    deq = np.clip(np.round(g / s), -8, 7) * s
  else:
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    deq = np.clip(np.round((g - lo) / s), 0, 15) * s + lo
  return np.moveaxis(deq.reshape(x.shape), -1, axis)


def _dequantized_reference(model, params, group, fmt="uint4"):
  """The float params with every projection and an untied head 4-bit-rounded (`_np_int4`,
  groups along each kernel's last contracted axis), the embedding int8-rounded per row."""
  flat = tu.flatten_dict(params)
  for path, (k, ndim) in _kernels(model, params).items():
    w = np.asarray(flat[path])
    lead = w.ndim - ndim
    flat[path] = jnp.asarray(_np_int4(w, lead + k - 1, group, fmt).astype(np.float32))
  for path in list(flat):
    if path[-2:] == ("embed", "embedding"):
      e = np.asarray(flat[path], np.float64)  # int8, one absmax scale per row
      s = np.abs(e).max(1, keepdims=True) / 127
      s = np.where(s > 0, s, 1.0)
      flat[path] = jnp.asarray((np.clip(np.round(e / s), -127, 127) * s).astype(np.float32))
  return tu.unflatten_dict(flat)


@pytest.mark.parametrize("scan,tie,kw,fmt", [(False, True, {}, "uint4"),
                                             (True, False, {"qkv_bias": True}, "int4"),
                                             (True, True, {}, "nf4")])
def test_packed_int4_forward_equals_dequantized_model(scan, tie, kw, fmt):
  model, params = _model(scan, tie, **kw)
  pk = packed_int4.pack(model, params, "nf4" if fmt == "nf4" else "int4", group_size=GROUP,
                        symmetric=fmt == "int4")
  assert pk.fmt == ("nf4" if fmt == "nf4" else "int4")
  ref = _dequantized_reference(model, params, GROUP, fmt)
  # One row (the streamed nibble halves), a few rows (lmjax.packed_rows), many rows (a matmul).
  # Each compiled once per shape (eagerly every op would compile on its own).
  run_ref = jax.jit(lambda p, x: model.apply({"params": p}, x))
  run_packed = jax.jit(lambda p, x: packed.apply(model, p, x))
  for b, t in ((1, 1), (1, 5), (3, 8)):
    x = tokens(1, b, t)
    want = np.asarray(run_ref(ref, x), np.float64)
    got = np.asarray(run_packed(pk, x), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Layout: two codes per byte, output-major, a scale per group of GROUP inputs.
  for path, *_ in pk.packed:
    node = pk.tree
    for name in path[:-1]:
      node = node[name]
    codes, scale = node[path[-1]], node[path[-1] + "_scale"]
    assert codes.dtype == jnp.uint8 and scale.dtype == jnp.float32
    assert codes.shape[-1] * 2 == scale.shape[-2] * GROUP
    assert scale.shape[-1] == (1 if fmt == "nf4" else 2)  # nf4: absmax; int4: scale, offset
  emb = pk.tree["embed"]["embedding"]
  assert emb.dtype == jnp.int8 and emb.shape == (97, 32)
  # unpack gives the dequantized weights back in the model's layout.
  back = packed.unpack(pk)
  layer = "layers" if scan else "layers_0"
  np.testing.assert_allclose(np.asarray(back["decoder"][layer]["mlp"]["wo"]["kernel"]),
                             np.asarray(ref["decoder"][layer]["mlp"]["wo"]["kernel"]),
                             atol=1e-6)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_packed_4bit_decodes_like_the_dequantized_model(fmt):
  model, params = _model(False, True)
  pk = packed_int4.pack(model, params, fmt, group_size=GROUP)  # nf4's default 64 > tiny's width
  ref = _dequantized_reference(model, params, GROUP, "nf4" if fmt == "nf4" else "uint4")
  prompts = [[5, 6, 7, 8, 9]]
  want = infer.generate(model, ref, prompts, max_new_tokens=12, ignore_eos=True)
  got = infer.generate(model, pk, prompts, max_new_tokens=12, ignore_eos=True)
  assert got.tokens == want.tokens and len(set(want.tokens[0])) > 1
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-4)
  # Packing the int4 (symmetric) / nf4 QuantParams of the same group size gives the same arrays
  # as packing the float params.
  again = packed.pack(model, quant.quantize(model, params, fmt, GROUP, embeddings=False), fmt)
  same = packed_int4.pack(model, params, fmt, group_size=GROUP, symmetric=True)
  for a, b in zip(jax.tree.leaves(again.tree), jax.tree.leaves(same.tree), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if fmt == "nf4":  # double-quantized scales: the weights the QuantParams dequantize to
    qp = quant.quantize(model, params, "nf4", GROUP, embeddings=False, double_quant=True)
    want, got = (tu.flatten_dict(t) for t in (quant.dequantize_params(qp),
                                              packed.unpack(packed.pack(model, qp, "nf4"))))
    for path, *_ in pk.packed:
      np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7)


def test_bad_input():
  model, params = _model(False, True)
  with pytest.raises(ValueError, match="needs int4 or uint4 weights"):
    packed.pack(model, quant.quantize(model, params, "nf4", 8), "int4")
  with pytest.raises(ValueError, match="group size 12 does not divide"):
    packed_int4.pack(model, params, group_size=12)
  with pytest.raises(ValueError, match="unknown packed format 'int2'"):
    packed.pack(model, params, "int2")
  with pytest.raises(ValueError, match="packed nf4 needs nf4 weights; got fmt='int4'"):
    packed.pack(model, quant.quantize(model, params, "int4", 8), "nf4")
  with pytest.raises(ValueError, match="packed 4-bit formats are"):
    packed_int4.pack(model, params, "int8")
