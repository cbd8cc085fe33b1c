"""Model behaviour: causality, bidirectional encoders, packing, padding, the KV cache, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import init, tiny, tokens

TOL = dict(rtol=2e-5, atol=2e-5)


def _jit(model, **static):
  """`model.apply` under `jax.jit` (one compile, not one per op), static keywords closed over."""
  return jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **static, **kw))


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_causality_by_perturbation(family, use_jit):
  cfg = tiny(family)
  x = tokens(0, 2, 12)
  enc = tokens(1, 2, 7)
  inputs = (enc, x) if family == "seq2seq" else (x,)
  model, p = init(cfg, *inputs)

  def run(tok):
    args = (enc, tok) if family == "seq2seq" else (tok,)
    return model.apply({"params": p}, *args)

  fn = jax.jit(run) if use_jit else run
  base = fn(x)
  for t in (0, 5, 11):
    changed = fn(x.at[:, t].set((x[:, t] + 7) % 97))
    np.testing.assert_array_equal(changed[:, :t], base[:, :t])
    assert not np.allclose(changed[:, t:], base[:, t:])


def test_seq2seq_decoder_sees_whole_encoder():
  cfg = tiny("seq2seq")
  enc, dec = tokens(1, 1, 7), tokens(0, 1, 5)
  model, p = init(cfg, enc, dec)
  base = model.apply({"params": p}, enc, dec)
  changed = model.apply({"params": p}, enc.at[:, -1].set(3), dec)
  assert not np.allclose(changed[:, 0], base[:, 0])


@pytest.mark.parametrize("family", ["masked", "seq2seq"])
def test_encoders_are_bidirectional(family):
  """Every encoder output depends on every input token: on later ones (what a causal encoder
  would miss) as on earlier ones. MaskedLM: its logits; Seq2SeqLM: `encode`'s outputs."""
  cfg = tiny(family)
  t = 9
  x = tokens(16, 2, t)
  if family == "masked":
    model, p = init(cfg, x)
    run = jax.jit(lambda tok: model.apply({"params": p}, tok))
  else:
    model, p = init(cfg, x, tokens(17, 2, 4))
    run = jax.jit(lambda tok: model.apply({"params": p}, tok, method="encode"))
  base = np.asarray(run(x))
  for i in (0, t // 2, t - 1):
    out = np.asarray(run(x.at[:, i].set(x[:, i] % 96 + 1)))  # another id in [1, 97)
    # Per position, the largest change over the batch and the output's features.
    moved = np.max(np.abs(out - base), axis=(0, 2))
    assert np.all(moved > 1e-4), (i, moved)


@pytest.mark.parametrize("family", ["causal", "masked"])
def test_packed_equals_separate(family):
  cfg = tiny(family)
  a, b = tokens(2, 1, 7), tokens(3, 1, 5)
  model, p = init(cfg, a)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 5])
  out = model.apply({"params": p}, packed, segment_ids=seg)  # positions restart per segment
  np.testing.assert_allclose(out[:, :7], model.apply({"params": p}, a), **TOL)
  np.testing.assert_allclose(out[:, 7:], model.apply({"params": p}, b), **TOL)


def test_packed_seq2seq_equals_separate():
  cfg = tiny("seq2seq")
  ea, eb, da, db = tokens(2, 1, 6), tokens(3, 1, 4), tokens(4, 1, 5), tokens(5, 1, 3)
  model, p = init(cfg, ea, da)
  run = _jit(model)
  out = run(p, jnp.concatenate([ea, eb], 1), jnp.concatenate([da, db], 1),
            encoder_segment_ids=jnp.array([[1] * 6 + [2] * 4]),
            decoder_segment_ids=jnp.array([[1] * 5 + [2] * 3]))
  np.testing.assert_allclose(out[:, :5], run(p, ea, da), **TOL)
  np.testing.assert_allclose(out[:, 5:], run(p, eb, db), **TOL)


@pytest.mark.parametrize("family", ["causal", "masked", "seq2seq"])
def test_right_padding_does_not_change_real_positions(family):
  cfg = tiny(family)
  x = tokens(4, 1, 6)
  padded = jnp.concatenate([x, jnp.zeros((1, 4), jnp.int32)], axis=1)
  seg = jnp.array([[1] * 6 + [0] * 4])
  if family == "seq2seq":
    dec = tokens(5, 1, 3)
    model, p = init(cfg, x, dec)
    want = model.apply({"params": p}, x, dec)
    got = model.apply({"params": p}, padded, dec, encoder_segment_ids=seg)
    np.testing.assert_allclose(got, want, **TOL)
    return
  model, p = init(cfg, x)
  got = model.apply({"params": p}, padded, segment_ids=seg)
  np.testing.assert_allclose(got[:, :6], model.apply({"params": p}, x), **TOL)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("prefill", [False, True])
def test_cache_matches_full_forward_causal(scan, prefill):
  cfg = tiny(scan_layers=scan)
  x = tokens(6, 2, 10)
  model, p = init(cfg, x)
  full = _jit(model)(p, x)
  cache = lmjax.init_cache(cfg, 2, 16)
  logits, cache = _jit(model, prefill=prefill)(p, x[:, :4], cache=cache)
  steps = [logits]
  step = _jit(model)
  for t in range(4, 10):
    lt, cache = step(p, x[:, t:t + 1], cache=cache)
    steps.append(lt)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [10, 10])


def test_cache_rows_at_different_lengths():
  """Right-padded prompts of lengths 3 and 6 in one cache continue each at its own position."""
  cfg = tiny()
  a, b = tokens(7, 1, 8), tokens(8, 1, 8)
  model, p = init(cfg, a)
  prompts = jnp.concatenate([a[:, :6].at[:, 3:].set(0), b[:, :6]], axis=0)
  seg = jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6])
  cache = lmjax.init_cache(cfg, 2, 12)
  _, cache = _jit(model, prefill=True)(p, prompts, segment_ids=seg, cache=cache)
  np.testing.assert_array_equal(cache.lengths, [3, 6])
  nxt = jnp.concatenate([a[:, 3:4], b[:, 6:7]], axis=0)
  step, cache = _jit(model)(p, nxt, cache=cache)
  # No-cache recomputes of the whole rows (causal: position i sees tokens <= i only).
  ref = _jit(model)(p, jnp.concatenate([a, b], axis=0))
  np.testing.assert_allclose(step[0, 0], ref[0, 3], **TOL)
  np.testing.assert_allclose(step[1, 0], ref[1, 6], **TOL)


@pytest.mark.parametrize("scan", [False, True])
def test_cache_matches_full_forward_seq2seq(scan):
  cfg = tiny("seq2seq", scan_layers=scan)
  enc, dec = tokens(9, 2, 7), tokens(10, 2, 6)
  model, p = init(cfg, enc, dec)
  run = _jit(model)
  full = run(p, enc, dec)
  cache = lmjax.init_cache(cfg, 2, 8, encoder_len=7)
  logits, cache = run(p, enc, dec[:, :2], cache=cache)
  steps = [logits]
  for t in range(2, 6):
    lt, cache = run(p, None, dec[:, t:t + 1], cache=cache)
    steps.append(lt)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  cfg = tiny(dropout_rate=0.3)
  x = tokens(11, 2, 8)
  model, p = init(cfg, x)
  a = model.apply({"params": p}, x)
  np.testing.assert_array_equal(a, model.apply({"params": p}, x))
  t1 = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(t1, a) and not np.allclose(t1, t2)


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  x = tokens(12, 2, 8)
  model32, p = init(tiny(), x)
  model16 = lmjax.CausalLM(tiny(dtype="bfloat16"))
  out16 = model16.apply({"params": p}, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, model32.apply({"params": p}, x), atol=0.05)


def test_cache_layout_must_match_the_model():
  cfg = tiny()
  x = tokens(13, 1, 4)
  model, p = init(cfg, x)
  stacked = lmjax.init_cache(cfg.replace(scan_layers=True), 1, 8)
  assert stacked.stacked and not lmjax.init_cache(cfg, 1, 8).stacked
  with pytest.raises(ValueError, match="layer layout does not match scan_layers=False"):
    model.apply({"params": p}, x, cache=stacked)


def test_repeat_rows_repeats_each_row_in_place():
  for scan in (False, True):
    cfg = tiny(scan_layers=scan)
    x = tokens(14, 2, 5)
    model, p = init(cfg, x)
    _, cache = _jit(model, prefill=True)(p, x, cache=lmjax.init_cache(cfg, 2, 8))
    rep = cache.repeat_rows(3)
    np.testing.assert_array_equal(rep.lengths, [5] * 6)
    nxt = jnp.repeat(x[:, -1:], 3, axis=0)
    step = _jit(model)
    got, _ = step(p, nxt, cache=rep)
    # Row 3 (a copy of row 1) continues row 1's cache, not row 0's.
    ref, _ = step(p, x[:, -1:], cache=cache)
    np.testing.assert_allclose(got[::3], ref, **TOL)
    np.testing.assert_allclose(got[1::3], ref, **TOL)
    np.testing.assert_allclose(got[2::3], ref, **TOL)


def test_bfloat16_cached_decode_matches_float32():
  """GQA 9/3 heads of width 64 (SmolLM2's attention shape), batch 8, bfloat16 compute."""
  cfg = tiny(model_dim=96, num_heads=9, num_kv_heads=3, head_dim=64)
  x = tokens(15, 8, 6)
  model32, p = init(cfg, x)
  cfg16 = cfg.replace(dtype="bfloat16")
  model16 = lmjax.CausalLM(cfg16)
  _, cache = _jit(model16, prefill=True)(p, x[:, :5], cache=lmjax.init_cache(cfg16, 8, 8))
  step, _ = _jit(model16)(p, x[:, 5:], cache=cache)
  assert step.dtype == jnp.float32
  np.testing.assert_allclose(step[:, 0], _jit(model32)(p, x)[:, 5], atol=0.05)
