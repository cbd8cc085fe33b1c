"""Loading a checkpoint onto a mesh reads each device's slice alone: the values equal the
one-device load (float64 reference of the layout change), stacked (scanned) layers included,
and host memory never holds a whole tensor (what lets each host of a pod slice read only its
own slices)."""

from __future__ import annotations

import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import lmjax
from lmjax.convert import layout, safetensors_io
from tests.lmjax import pretrained_fixtures as fx


def _reference(cfg, weights) -> dict:
  """The lmjax tree by float64 numpy: transpose, split the head axis, stack scanned layers."""
  out = {}
  for path, (names, kind, shape) in layout.plan(cfg).items():
    stacked = cfg.scan_layers and names[0].startswith("model.layers.")
    lm_shape = shape[1:] if stacked else shape
    parts = []
    for n in names:
      w = np.asarray(weights[n], np.float64)
      parts.append(w.reshape(lm_shape) if kind in ("vector", "bias") else w.T.reshape(lm_shape))
    out[path] = np.stack(parts) if stacked else parts[0]
  return out


@pytest.mark.parametrize("scan,stored", [(False, "float32"), (True, "bfloat16")])
def test_mesh_load_equals_the_reference_layout(tmp_path, scan, stored):
  cfg = fx.tiny_config(tie_embeddings=False, scan_layers=scan)
  weights = {k: v.astype(ml_dtypes.bfloat16 if stored == "bfloat16" else np.float32)
             for k, v in fx.hf_weights(cfg).items()}
  safetensors_io.save_file(tmp_path / "w.safetensors", weights)
  tensors = safetensors_io.open_file(tmp_path / "w.safetensors")
  mesh = lmjax.make_mesh(data=1, fsdp=4, tensor=2)
  got = flatten_dict(layout.build_params(cfg, tensors, where="test", mesh=mesh))
  want = _reference(cfg, weights)
  assert set(got) == set(want)
  split = 0
  for k, x in got.items():
    np.testing.assert_array_equal(np.asarray(x, np.float64), want[k], err_msg=str(k))
    for s in x.addressable_shards:  # each device holds exactly its part of the reference
      np.testing.assert_array_equal(np.asarray(s.data, np.float64), want[k][s.index])
    split += x.addressable_shards[0].data.shape != x.shape
  assert split >= 8


def test_host_memory_holds_slices_not_tensors(tmp_path):
  # One big tensor (the embedding, 2 MiB in float32) dominates; split 8 ways over the mesh.
  cfg = fx.tiny_config(vocab_size=8192, tie_embeddings=True)
  weights = fx.hf_weights(cfg)
  safetensors_io.save_file(tmp_path / "w.safetensors", weights)
  biggest = max(w.nbytes for w in weights.values())
  mesh = lmjax.make_mesh(data=1, fsdp=8, tensor=1)
  tensors = safetensors_io.open_file(tmp_path / "w.safetensors")
  jax.block_until_ready(layout.build_params(cfg, tensors, where="warm-up", mesh=mesh))
  tracemalloc.start()
  try:
    got = layout.build_params(cfg, tensors, where="test", mesh=mesh)
    jax.block_until_ready(got)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  emb = got["embed"]["embedding"]
  assert emb.addressable_shards[0].data.size * 8 == emb.size  # really split 8 ways
  # A whole-tensor read converts (and copies) the 2 MiB embedding at least once; slices are
  # handed to the devices as views of the memory map (XLA copies them in, a slice at a time).
  assert peak < biggest / 2, (peak, biggest)
