"""Packed int8 (`lmjax.packed.pack(model, params, "int8")`): the int8 codes of
`lmjax.quant.quantize(..., "int8", per_output=True)`, output-major; its forward and decoding
against the `QuantParams` reader and a float64 numpy reference of per-output int8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infer
import lmjax
from lmjax import packed, quant
from tests.lmjax.helpers import random_params, tiny, tokens


def _model(scan, tie):
  cfg = tiny(scan_layers=scan, tie_embeddings=tie)
  model = lmjax.model_for(cfg)
  return model, random_params(model, (tokens(0, 1, 8),), 0)


def _np_int8(w, contracted):
  """float64 per-output int8: absmax over the first `contracted` axes, round to nearest."""
  x = np.asarray(w, np.float64)
  s = np.abs(x).max(axis=tuple(range(contracted)), keepdims=True) / 127
  s = np.where(s > 0, s, 1.0)
  return np.clip(np.round(x / s), -127, 127) * s


@pytest.mark.parametrize("scan,tie", [(False, True), (True, False)])
def test_packed_int8_forward_equals_quantized_reader(scan, tie):
  model, params = _model(scan, tie)
  pk = packed.pack(model, params, "int8")
  qp = quant.quantize(model, params, "int8", per_output=True)
  t = tokens(1, 2, 8)
  want = np.asarray(quant.apply(model, qp, t))
  # Many rows (a matmul on the dequantized matrix); one token (streamed int8 rows, the scale
  # applied after each row's dot: the batch-1 decode path).
  np.testing.assert_allclose(np.asarray(packed.apply(model, pk, t)), want, atol=1e-5, rtol=1e-5)
  one = np.asarray(quant.apply(model, qp, t[:1, :1]))
  np.testing.assert_allclose(np.asarray(packed.apply(model, pk, t[:1, :1])), one, atol=1e-5,
                             rtol=1e-5)
  # Every packed matrix: int8 codes, output-major, one float32 scale per output row.
  for path, *_ in pk.packed:
    node = pk.tree
    for name in path[:-1]:
      node = node[name]
    codes, scale = node[path[-1]], node[path[-1] + "_scale"]
    assert codes.dtype == jnp.int8 and scale.shape == codes.shape[:-1] + (1,)
  # The attention output [N, H, D] (two contracted axes): per output over N and H, as numpy.
  layer = "layers" if scan else "layers_0"
  src = params["decoder"][layer]["self_attention"]["out"]["kernel"]
  got = np.asarray(packed.unpack(pk)["decoder"][layer]["self_attention"]["out"]["kernel"])
  ref = np.stack([_np_int8(w, 2) for w in src]) if scan else _np_int8(src, 2)
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_packed_int8_decodes_like_the_quantized_reader():
  model, params = _model(False, True)
  pk = packed.pack(model, params, "int8")
  qp = quant.quantize(model, params, "int8", per_output=True)
  prompts = [[5, 6, 7, 8, 9]]
  want = infer.generate(model, qp, prompts, max_new_tokens=12, ignore_eos=True)
  got = infer.generate(model, pk, prompts, max_new_tokens=12, ignore_eos=True)
  assert got.tokens == want.tokens and len(set(want.tokens[0])) > 1
  np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-4)
  # Packing the QuantParams themselves gives the same arrays.
  again = packed.pack(model, qp, "int8")
  for a, b in zip(jax.tree.leaves(again.tree), jax.tree.leaves(pk.tree), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input():
  model, params = _model(False, True)
  with pytest.raises(ValueError, match="unknown packed format 'int3'"):
    packed.pack(model, params, "int3")
  with pytest.raises(ValueError, match="per-channel int8"):
    packed.pack(model, quant.quantize(model, params, "int4", 8), "int8")
  with pytest.raises(ValueError, match="per-channel int8"):
    packed.pack(model, quant.quantize(model, params, "int8", 8), "int8")


def test_packed_int8_keeps_scales_per_head():
  """int8 `QuantParams` with a scale per head and output (`quantize`'s default) pack with
  their groups (the slower batched product) and still equal their reader."""
  model, params = _model(False, True)
  qp = quant.quantize(model, params, "int8")
  pk = packed.pack(model, qp, "int8")
  scale = pk.tree["decoder"]["layers_0"]["self_attention"]["out"]["kernel_scale"]
  assert scale.shape == (32, 4)  # [D, N]
  t = tokens(1, 1, 1)
  np.testing.assert_allclose(np.asarray(packed.apply(model, pk, t)),
                             np.asarray(quant.apply(model, qp, t)), atol=1e-5, rtol=1e-5)
