"""Packed inference weights (`lmjax.packed`): exact widening, the same model, the layout.

Decoding from packed weights is tested in tests/infer/test_decode.py."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lmjax import packed
from tests.lmjax.helpers import init, tiny, tokens


def _rounded(params, fmt="bfloat16"):
  """The params with what packing stores in `fmt` (matrices, the embedding) rounded to it."""
  def r(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "['embed']['embedding']" in name:
      return a.astype(fmt).astype(jnp.float32)
    return a
  return jax.tree_util.tree_map_with_path(r, params)


def test_widen_is_exact_for_every_bfloat16():
  bits = np.arange(2**16, dtype=np.uint16)
  b16 = bits.view(ml_dtypes.bfloat16)
  got = np.asarray(packed.widen(jnp.asarray(b16)))
  want = b16.astype(np.float32)  # ml_dtypes' own conversion
  nan = np.isnan(want)
  np.testing.assert_array_equal(got[~nan], want[~nan])
  assert np.isnan(got[nan]).all()


CASES = {
    "causal": (tiny("causal"), 1),
    "causal-scan": (tiny("causal", scan_layers=True), 1),
    "causal-untied-qkv-bias": (tiny("causal", tie_embeddings=False, qkv_bias=True), 1),
    "masked": (tiny("masked"), 1),
    "seq2seq": (tiny("seq2seq"), 2),
}


@pytest.mark.parametrize("fmt", packed.FORMATS)
@pytest.mark.parametrize("name", list(CASES))
def test_packed_forward_equals_the_model_on_the_same_weights(name, fmt):
  cfg, n_inputs = CASES[name]
  x = tokens(0, 2, 12)
  inputs = (x,) * n_inputs
  model, params = init(cfg, *inputs)
  pk = packed.pack(model, params, fmt)
  want = model.apply({"params": _rounded(params, fmt)}, *inputs)
  got = packed.apply(model, pk, *inputs)
  # One token of one sequence too: the one-row path (`lmjax.quant.cpu_float`'s kernel on an
  # x86-64 CPU, else one loop per output streaming its row; the attention output materialised
  # flat before its projection).
  one = tuple(a[:1, :1] for a in inputs)
  np.testing.assert_allclose(np.asarray(packed.apply(model, pk, *one)),
                             np.asarray(model.apply({"params": _rounded(params, fmt)}, *one)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Every projection was packed, output-major, 2 bytes per weight.
  n_einsums = sum(1 for path in jax.tree_util.tree_flatten_with_path(params)[0]
                  if "kernel" in jax.tree_util.keystr(path[0]))
  assert len(pk.packed) == n_einsums
  for path, _, _, _ in pk.packed:
    w = pk.tree
    for name in path:
      w = w[name]
    assert w.dtype == fmt
  for a, b in zip(jax.tree.leaves(packed.unpack(pk)), jax.tree.leaves(_rounded(params, fmt)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layout_is_output_major():
  cfg = tiny("causal")
  model, params = init(cfg, tokens(0, 1, 4))
  pk = packed.pack(model, params)
  att = params["decoder"]["layers_0"]["self_attention"]
  patt = pk.tree["decoder"]["layers_0"]["self_attention"]
  # query [D, N, H] -> [N * H, D]; out [N, H, D] -> [D, N * H]
  nh = cfg.num_heads * cfg.resolved_head_dim
  np.testing.assert_array_equal(
      np.asarray(patt["query"]["kernel"], np.float32),
      np.asarray(jnp.transpose(att["query"]["kernel"], (1, 2, 0)).reshape(nh, cfg.model_dim)
                 .astype(jnp.bfloat16), np.float32))
  np.testing.assert_array_equal(
      np.asarray(patt["out"]["kernel"], np.float32),
      np.asarray(jnp.transpose(att["out"]["kernel"], (2, 0, 1)).reshape(cfg.model_dim, nh)
                 .astype(jnp.bfloat16), np.float32))


def test_bad_input():
  cfg = tiny("causal")
  model, params = init(cfg, tokens(0, 1, 4))
  with pytest.raises(ValueError, match="unknown packed format 'int3'"):
    packed.pack(model, params, "int3")
  pk = packed.pack(model, params)
  with pytest.raises(ValueError, match="already packed"):
    packed.pack(model, pk)
  other, other_params = init(tiny("causal", model_dim=48), tokens(0, 1, 4))
  with pytest.raises(ValueError, match="params do not match CausalLM"):
    packed.pack(model, other_params)
