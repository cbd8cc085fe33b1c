"""GGUF Q8_0 / Q4_0 / Q4_1 blocks kept as they are (`load_pretrained(path, quant="keep")`): the
kept codes, scales and minimums dequantize to exactly the float importer's values (GGUF's own
block decoding, `lmjax.convert.gguf.dequantize`, in the float layout), on tiny llama GGUFs
written the way llama.cpp writes them (q/k rows permuted, untied head, q/k/v biases, a float
matrix among quantized ones)."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from lmjax import quant
from tests.lmjax import pretrained_fixtures as fx

pytest.importorskip("gguf")

HEADS = dict(head_dim=32, num_heads=2, num_kv_heads=1)  # blocks of 32 inside one head


def _write(path, qtype, **kw):
  cfg = fx.tiny_config(**{**HEADS, **kw})
  w = fx.hf_weights(cfg)
  types = {k: qtype for k, v in w.items() if v.ndim == 2}
  types["model.embed_tokens.weight"] = "Q8_0"
  types["model.layers.1.mlp.up_proj.weight"] = "F32"
  return fx.write_gguf(path, cfg, w, types=types)


@pytest.mark.parametrize("qtype,kw", [("Q4_1", {}),
                                      ("Q4_0", {"tie_embeddings": False, "qkv_bias": True}),
                                      ("Q8_0", {"tie_embeddings": False})])
def test_kept_blocks_dequantize_to_the_float_import(tmp_path, qtype, kw):
  path = _write(tmp_path / "m.gguf", qtype, **kw)
  _, floats, _ = lmjax.load_pretrained(path)
  cfg, kept, _ = lmjax.load_pretrained(path, quant="keep")
  flat = flatten_dict(kept.tree, is_leaf=lambda _, x: isinstance(x, quant.QArray))
  fmts = {"/".join(p): x.fmt for p, x in flat.items() if isinstance(x, quant.QArray)}
  want = {"Q4_1": "uint4", "Q4_0": "int4", "Q8_0": "int8"}[qtype]
  assert fmts.pop("embed/embedding") == "int8"
  assert "decoder/layers_1/mlp/wi_up/kernel" not in fmts  # the F32 matrix stays float
  assert set(fmts.values()) == {want} and len(fmts) == 13 + (not cfg.tie_embeddings)
  got, ref = flatten_dict(quant.dequantize_params(kept)), flatten_dict(floats)
  assert set(got) == set(ref)
  for p in ref:
    np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(ref[p]), err_msg="/".join(p))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(floats))


def test_blocks_across_heads_are_refused(tmp_path):
  path = _write(tmp_path / "m.gguf", "Q4_1", head_dim=16, num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match="out/kernel has 16 values along its group axis, not "
                                       "whole 32-blocks"):
    lmjax.load_pretrained(path, quant="keep")
