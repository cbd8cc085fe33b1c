"""LoRA: identity at init, merge against float64 numpy, banks of mixed adapters, no recompiles,
bad input (lmjax.peft)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from lmjax import peft
from tests.lmjax.helpers import tiny
from tests.lmjax.peft_fixtures import random_adapter, tiny_base


def test_lora_at_init_is_the_base_exactly():
  b = tiny_base()
  spec = peft.LoRAConfig(rank=4, targets=("all-linear",))
  ad = peft.init(spec, b.cfg, jax.random.key(0))
  flat = flatten_dict(nn.meta.unbox(ad))
  assert any(np.abs(np.asarray(v)).max() > 0 for p, v in flat.items() if p[-1] == "lora_a")
  got = b.pfwd(peft.adapt(b.params, ad, spec), b.x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(b.fwd(b.params, b.x)))


def _np_merge(params, adapter, scale):
  """float64 numpy: W + scale * A B, in the kernel's shape."""
  flat = {p: np.asarray(v, np.float64) for p, v in flatten_dict(params).items()}
  ad = flatten_dict(adapter)
  for mod in {p[:-1] for p in ad}:
    a, b = np.asarray(ad[mod + ("lora_a",)], np.float64), np.asarray(ad[mod + ("lora_b",)],
                                                                      np.float64)
    w = flat[mod + ("kernel",)]
    lead = a.ndim + b.ndim - 2 - w.ndim
    r = a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (-1, r))
    b2 = b.reshape(b.shape[:lead] + (r, -1))
    flat[mod + ("kernel",)] = w + scale * np.matmul(a2, b2).reshape(w.shape)
  return unflatten_dict({p: jnp.asarray(v, jnp.float32) for p, v in flat.items()})


def test_lora_equals_float64_merged_weights_and_merge_is_idempotent():
  # scanned layers ([L, ...] adapter leaves) and rsLoRA scaling; the unscanned merge is checked
  # against Hugging Face's files in tests/train/test_peft_sft.py
  b = tiny_base(scan=True)
  spec = peft.LoRAConfig(rank=3, alpha=5.0, targets=("q_proj", "value", "out", "wo"),
                         rslora=True)
  ad = random_adapter(spec, b.cfg, 3)
  want = b.fwd(_np_merge(b.params, ad, 5.0 / np.sqrt(3)), b.x)
  adapted = peft.adapt(b.params, ad, spec)
  got = b.pfwd(adapted, b.x)
  assert np.abs(np.asarray(want) - np.asarray(b.fwd(b.params, b.x))).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  once = peft.merge_adapted(adapted)
  twice = peft.merge_adapted(once)
  for a in (once, twice):
    np.testing.assert_allclose(b.pfwd(a, b.x), want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(b.fwd(peft.merge(b.params, ad, spec), b.x), want,
                             atol=2e-5, rtol=2e-5)
  params = b.params
  back = peft.unmerge_adapted(twice)
  for p, v in flatten_dict(params).items():
    np.testing.assert_allclose(flatten_dict(back.base)[p], v, atol=1e-6)


def test_mixed_adapter_batch_equals_each_row_alone():
  # scanned layers: the bank's [M] axis after [L]; generate's test covers the unscanned bank
  b = tiny_base(scan=True)
  params, x = b.params, b.x
  sa = peft.LoRAConfig(rank=2, alpha=4.0, targets=("query", "value"))
  sb = peft.LoRAConfig(rank=4, alpha=2.0, targets=("key", "wi_up"))
  ada, adb = random_adapter(sa, b.cfg, 1), random_adapter(sb, b.cfg, 2)
  bank = peft.stack(params, {"a": (ada, sa), "b": (adb, sb)})
  rows = ["a", None, "b"]
  got = np.asarray(b.pfwd(peft.with_rows(bank, rows), x))
  alone = {"a": b.pfwd(peft.adapt(params, ada, sa), x),
           "b": b.pfwd(peft.adapt(params, adb, sb), x),
           None: b.fwd(params, x)}
  for i, r in enumerate(rows):
    np.testing.assert_allclose(got[i], np.asarray(alone[r])[i], atol=2e-5, rtol=2e-5)


def test_switching_adapters_does_not_recompile():
  b = tiny_base()
  cfg, model, params, x = b.cfg, b.model, b.params, b.x
  spec = peft.LoRAConfig(rank=2, targets=("query",))
  traces = []

  @jax.jit
  def f(adapted, x):
    traces.append(1)
    return peft.apply(model, adapted, x)

  outs = [f(peft.adapt(params, random_adapter(spec, cfg, s), spec), x) for s in (1, 2, 3)]
  bank = peft.stack(params, {"a": (random_adapter(spec, cfg, 1), spec),
                             "b": (random_adapter(spec, cfg, 2), spec)})
  banked = [f(peft.with_rows(bank, r), x) for r in (["a"] * 3, ["b"] * 3, ["b", None, "a"])]
  assert len(traces) == 2  # one program for single adapters, one for the bank
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-3
  np.testing.assert_allclose(banked[0], outs[0], atol=2e-5)
  np.testing.assert_allclose(banked[1], outs[1], atol=2e-5)


def test_bad_input_is_refused_before_compute():
  b = tiny_base()
  cfg, model, params, x = b.cfg, b.model, b.params, b.x
  with pytest.raises(ValueError, match="matches no projection.*query"):
    peft.init(peft.LoRAConfig(targets=("qproj",)), cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="rank=0 must be"):
    peft.LoRAConfig(rank=0)
  with pytest.raises(ValueError, match="above the width"):
    peft.init(peft.LoRAConfig(rank=33, targets=("query",)), cfg, jax.random.key(0))
  spec = peft.LoRAConfig(rank=2, targets=("query",))
  other = tiny(model_dim=48, num_heads=4)
  ad = nn.meta.unbox(peft.init(spec, other, jax.random.key(0)))
  with pytest.raises(ValueError, match="another model"):
    peft.merge(params, ad, spec)
  bank = peft.stack(params, {"a": (ad, spec)})
  with pytest.raises(ValueError, match="unknown adapter 'c'"):
    peft.with_rows(bank, ["a", "c"])
  with pytest.raises(ValueError, match="needs each row's adapter"):
    peft.apply(model, bank, x)
