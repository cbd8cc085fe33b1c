"""lmjax.inspect: attention maps against a float64 softmax(Q K^T) built from the model's own
projections; the no-cache greedy decoder against cached decoding."""

import jax.numpy as jnp
import numpy as np
import pytest

import infer
from lmjax import inspect
from lmjax.embeddings import apply_rotary
from tests.lmjax.helpers import init, random_params, tiny, tokens


def _reference_maps(model, params, toks):
  """float64 softmax(Q K^T / sqrt(H)) per layer, causal for a CausalLM, from the q/k
  projections' outputs (flax's captured intermediates), rotated by position, GQA by repeat."""
  cfg = model.config
  _, state = model.apply({"params": params}, toks, capture_intermediates=True,
                         mutable=["intermediates"])
  stack = state["intermediates"]["decoder" if cfg.num_decoder_layers else "encoder"]
  b, t = toks.shape
  pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
  maps = []
  for i in range(cfg.num_decoder_layers or cfg.num_encoder_layers):
    att = stack[f"layers_{i}"]["self_attention"]
    q, k = att["query"]["__call__"][0], att["key"]["__call__"][0]
    if cfg.position == "rotary":
      q, k = apply_rotary(q, pos, cfg.rope_theta), apply_rotary(k, pos, cfg.rope_theta)
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, cfg.num_heads // cfg.resolved_num_kv_heads, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if cfg.num_decoder_layers:
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    maps.append(e / e.sum(-1, keepdims=True))
  return maps


@pytest.mark.parametrize("family", ["causal", "masked"])
def test_attention_weights_match_float64_reference(family):
  cfg = tiny(family)
  toks = tokens(1, 2, 12)
  model, _ = init(cfg, toks)
  params = random_params(model, (toks,), seed=3)
  maps = inspect.attention_weights(model, params, toks)
  want = _reference_maps(model, params, toks)
  assert len(maps) == len(want) == 2
  for got, ref in zip(maps, want):
    assert got.shape == (2, cfg.num_heads, 12, 12)
    np.testing.assert_allclose(got, ref, atol=2e-5)
  # The logits are the model's own: the recording attention returns the reference output.
  assert not np.allclose(maps[0][0, 0], maps[0][0, 1])  # heads differ (a real map)


def test_attention_weights_padding_and_errors():
  cfg = tiny()
  toks = tokens(2, 1, 8)
  model, params = init(cfg, toks)
  seg = jnp.array([[1] * 5 + [0] * 3])
  m = inspect.attention_weights(model, params, toks, segment_ids=seg)[0]
  np.testing.assert_allclose(m[0, :, :5].sum(-1), 1.0, atol=1e-6)
  # Real tokens never see padding, nor padding real tokens (segment ids, as the model masks).
  assert np.all(m[0, :, :5, 5:] == 0) and np.all(m[0, :, 5:, :5] == 0)
  with pytest.raises(ValueError, match="token ids must be in"):
    inspect.attention_weights(model, params, jnp.array([[1, 200]]))
  with pytest.raises(ValueError, match="scan_layers=False"):
    scanned = tiny(scan_layers=True)
    inspect.attention_weights(type(model)(scanned), params, toks)


def test_greedy_recompute_equals_cached_decoding():
  cfg = tiny()
  toks = tokens(3, 1, 4)
  model, _ = init(cfg, toks)
  params = random_params(model, (toks,), seed=5)
  prompts = [[5, 9, 3, 7, 11], [2, 4]]
  got = inspect.greedy_recompute(model, params, prompts, max_new_tokens=10)
  out = infer.generate(model, params, prompts, max_new_tokens=10, ignore_eos=True,
                       sampler=infer.sampling.Greedy())
  want = np.array([list(t) for t in out.tokens])
  np.testing.assert_array_equal(got, want)
  assert len(set(got[0].tolist())) > 1  # not a constant sequence
  with pytest.raises(ValueError, match="max_new_tokens"):
    inspect.greedy_recompute(model, params, prompts, max_new_tokens=0)
