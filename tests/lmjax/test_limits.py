"""Calls outside the model's limits: static shapes raise naming the limit, dynamic overflow gives
NaN rows (never plausible logits), and `lmjax.checked` raises with the row and the limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import init, tokens
from tests.lmjax.helpers import tiny as _tiny

TOL = dict(rtol=2e-5, atol=2e-5)


def tiny(family: str = "causal", **overrides) -> lmjax.TransformerConfig:
  """The helpers' tiny config with one layer per stack (these tests compile many calls)."""
  layers = {"causal": dict(num_decoder_layers=1), "masked": dict(num_encoder_layers=1),
            "seq2seq": dict(num_encoder_layers=1, num_decoder_layers=1)}[family]
  return _tiny(family, **layers, **overrides)


def _call(model, use_jit, **static):
  """model.apply (under jax.jit or not), non-array keyword arguments closed over."""
  fn = lambda p, *a, **kw: model.apply({"params": p}, *a, **static, **kw)  # noqa: E731
  return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("use_jit", [False, True])
def test_learned_positions_past_max_len_raise(use_jit):
  cfg = tiny(position="learned", max_len=16)
  model, p = init(cfg, tokens(0, 1, 4))
  call = _call(model, use_jit)
  with pytest.raises(ValueError, match=r"input of 20 tokens exceeds max_len=16 \(learned"):
    call(p, tokens(1, 2, 20))
  cache = lmjax.init_cache(cfg, 2, 32)  # a cache larger than the table does not lift the limit
  with pytest.raises(ValueError, match=r"max_len=16"):
    call(p, tokens(1, 2, 17), cache=cache)
  masked = tiny("masked", max_len=16)
  mmodel, mp = init(masked, tokens(0, 1, 4))
  with pytest.raises(ValueError, match=r"input of 17 tokens exceeds max_len=16"):
    mmodel.apply({"params": mp}, tokens(1, 1, 17))


@pytest.mark.parametrize("use_jit", [False, True])
def test_seq2seq_inputs_past_max_len_raise(use_jit):
  cfg = tiny("seq2seq", position="learned", max_len=16)
  model, p = init(cfg, tokens(0, 1, 4), tokens(1, 1, 4))
  call = _call(model, use_jit)
  with pytest.raises(ValueError, match=r"encoder input of 18 tokens exceeds max_len=16"):
    call(p, tokens(2, 1, 18), tokens(3, 1, 4))
  with pytest.raises(ValueError, match=r"decoder input of 19 tokens exceeds max_len=16"):
    call(p, tokens(2, 1, 4), tokens(3, 1, 19))
  cache = lmjax.init_cache(cfg, 1, 8, encoder_len=6)
  with pytest.raises(ValueError, match=r"encoder input of 7 tokens.*encoder_len=6"):
    call(p, tokens(2, 1, 7), tokens(3, 1, 2), cache=cache)


@pytest.mark.parametrize("use_jit", [False, True])
def test_step_wider_than_the_cache_raises(use_jit):
  cfg = tiny()  # rotary: no positions table, only the cache limits the step
  model, p = init(cfg, tokens(0, 1, 4))
  cache = lmjax.init_cache(cfg, 2, 8)
  for prefill in (False, True):
    call = _call(model, use_jit, prefill=prefill)
    with pytest.raises(ValueError, match=r"10 tokens .* KV cache of max_len=8"):
      call(p, tokens(1, 2, 10), cache=cache)


def _prefilled(cfg, model, p, prompts, seg, size):
  cache = lmjax.init_cache(cfg, prompts.shape[0], size)
  _, cache = _call(model, True, prefill=True)(p, prompts, segment_ids=seg, cache=cache)
  return cache


@pytest.mark.parametrize("scan", [False, True])
def test_cache_overflow_gives_nan_rows_only(scan):
  """Rows of 3, 6 and 5 prompt tokens in a cache of 8, then a 3-token step: only row 1 (6 + 3)
  overflows; row 2 (5 + 3) fills the cache exactly. Rows 0 and 2 match a no-cache recompute."""
  cfg = tiny(scan_layers=scan)
  x = tokens(4, 3, 9)
  model, p = init(cfg, x)
  # The no-cache recompute of all 9 tokens of every row, compiled once (causal: position i's
  # logits see tokens <= i only, so each prefix's logits are these).
  ref = _call(model, True)(p, x)
  seg = jnp.array([[1] * 3 + [0] * 3, [1] * 6, [1] * 5 + [0]])
  cache = _prefilled(cfg, model, p, x[:, :6] * seg, seg, 8)
  step_seg = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
  nxt = jnp.stack([x[0, 3:6], x[1, 6:9], x[2, 5:8]])
  run = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, segment_ids=s, cache=c))
  got, new = run(p, nxt, step_seg, cache)
  assert np.isnan(got[1]).all(), "the overflowing row must be all NaN"
  assert np.isfinite(np.asarray(got)[[0, 2]]).all()
  np.testing.assert_allclose(got[0], ref[0, 3:6], **TOL)
  np.testing.assert_allclose(got[2], ref[2, 5:8], **TOL)
  np.testing.assert_array_equal(new.lengths, [6, 9, 8])  # tokens taken: row 1 passed 8
  np.testing.assert_array_equal(new.overflowed, [False, True, False])
  # Padding past the end is not an overflow; the row's real tokens fit.
  got2, _ = run(p, nxt, jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]]), cache)
  assert np.isfinite(got2).all()
  np.testing.assert_allclose(got2[1, :2], ref[1, 6:8], **TOL)
  # Once overflowed, every later step of that row stays NaN; the others go on.
  step, _ = run(p, jnp.stack([x[0, 6:7], x[1, 0:1], x[2, 0:1]]), jnp.ones((3, 1), jnp.int32),
                new)
  assert np.isnan(step[1]).all() and np.isnan(step[2]).all()  # row 2 was full: 9 > 8
  np.testing.assert_allclose(step[0, 0], ref[0, 6], **TOL)


def test_prefill_overflow_gives_nan_rows_only():
  """A prefill whose real tokens pass the cache (their keys would be lost) gives a NaN row."""
  cfg = tiny()
  x = tokens(5, 2, 6)
  model, p = init(cfg, x)
  seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  cache = lmjax.init_cache(cfg, 2, 6).replace(lengths=jnp.array([1, 2]))  # 1 + 6 > 6; 2 + 4 fits
  got, _ = model.apply({"params": p}, x * seg, segment_ids=seg, cache=cache, prefill=True)
  assert np.isnan(got[0]).all()
  np.testing.assert_allclose(got[1, :4], _call(model, True)(p, x[1:2, :4])[0], **TOL)


def test_learned_position_overflow_gives_nan_rows_only():
  """Explicit (traced) positions past the table: that row is NaN, the other matches a reference.
  A padding token's out-of-range position is not an overflow and does not poison its row."""
  cfg = tiny(position="learned", max_len=16)
  x = tokens(6, 2, 6)
  model, p = init(cfg, x)
  run = jax.jit(lambda p, t, pos, s: model.apply({"params": p}, t, positions=pos, segment_ids=s))
  pos = jnp.array([[10, 11, 12, 13, 14, 15], [12, 13, 14, 15, 16, 17]])
  seg = jnp.ones((2, 6), jnp.int32)
  got = run(p, x, pos, seg)
  assert np.isnan(got[1]).all(), "every logit of the row must be NaN, not just past the table"
  ref = _call(model, True)  # the in-range rows alone (no overflow in the call), compiled
  np.testing.assert_allclose(got[0], ref(p, x[:1], positions=pos[:1])[0], **TOL)
  got = run(p, x, pos, jnp.array([[1] * 6, [1] * 4 + [0] * 2]))  # 16, 17 are padding now
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[1, :4], ref(p, x[1:2, :4], positions=pos[1:2, :4])[0], **TOL)
  # Packed segments restart their positions: one segment longer than the table overflows.
  long = jnp.array([[1] * 9 + [2] * 9, [1] * 17 + [2]])
  got = run(p, tokens(7, 2, 18), None, long)
  assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
  masked = tiny("masked", max_len=16)
  mmodel, mp = init(masked, x)
  got = mmodel.apply({"params": mp}, x, positions=pos)
  assert np.isnan(got[1]).all()
  np.testing.assert_allclose(got[0], _call(mmodel, True)(mp, x[:1], positions=pos[:1])[0], **TOL)
  # A cache larger than the table: the step at position 16 is NaN, the row at 15 is not.
  y = tokens(8, 2, 17)
  seg = jnp.array([[1] * 16, [1] * 15 + [0]])
  cache = _prefilled(cfg, model, p, y[:, :16] * seg, seg, 32)
  got, _ = model.apply({"params": p}, jnp.stack([y[0, 16:17], y[1, 15:16]]), cache=cache)
  assert np.isnan(got[0]).all()
  np.testing.assert_allclose(got[1, 0], ref(p, y[1:2, :16])[0, 15], **TOL)


def test_seq2seq_overflow_gives_nan_rows_only():
  cfg = tiny("seq2seq", position="learned", max_len=16)
  enc, dec = tokens(9, 2, 5), tokens(10, 2, 6)
  model, p = init(cfg, enc, dec)
  cache = lmjax.init_cache(cfg, 2, 4, encoder_len=5)
  dseg = jnp.array([[1, 1, 1], [1, 1, 0]])
  _, cache = model.apply({"params": p}, enc, dec[:, :3] * dseg, decoder_segment_ids=dseg,
                         cache=cache, prefill=True)
  got, cache = model.apply({"params": p}, None, dec[:, 3:5], cache=cache)  # row 0: 3 + 2 > 4
  assert np.isnan(got[0]).all()
  ref = _call(model, True)(p, enc[1:], jnp.concatenate([dec[1:, :2], dec[1:, 3:5]], 1))
  np.testing.assert_allclose(got[1], ref[0, 2:], **TOL)
  # An encoder row whose (packed, traced) positions pass the table: that row's logits are NaN.
  eseg = jnp.array([[1] * 5, [1] * 5])
  epos = jnp.array([[0, 1, 2, 3, 4], [14, 15, 16, 17, 18]])
  run = jax.jit(lambda p, e, d, ep, es: model.apply({"params": p}, e, d, encoder_positions=ep,
                                                    encoder_segment_ids=es))
  got = run(p, enc, dec, epos, eseg)
  assert np.isnan(got[1]).all()
  np.testing.assert_allclose(got[0], _call(model, True)(p, enc[:1], dec[:1])[0], **TOL)


def test_checked_raises_with_row_and_limit():
  cfg = tiny()
  x = tokens(11, 3, 8)
  model, p = init(cfg, x)
  cache = lmjax.init_cache(cfg, 3, 8).replace(lengths=jnp.array([2, 7, 8]))
  apply = lmjax.checked(model.apply)
  with pytest.raises(ValueError, match=r"row 1: .*2 tokens at length 7.*max_len=8"):
    apply({"params": p}, x[:, :2], cache=cache)
  # Eagerly, checks=True raises by itself; under checkify (and jit) it is reported.
  with pytest.raises(ValueError, match=r"row 1: .*max_len=8"):
    model.apply({"params": p}, x[:, :2], cache=cache, checks=True)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, checks=True))
  err, _ = jax.experimental.checkify.checkify(step)(p, x[:, :1], cache)
  assert err.get() is not None and "row 2" in err.get() and "max_len=8" in err.get()
  ok = cache.replace(lengths=jnp.array([2, 7, 6]))
  got, _ = apply({"params": p}, x[:, :1], cache=ok)
  want, _ = _call(model, True)(p, x[:, :1], cache=ok)
  np.testing.assert_allclose(got, want, **TOL)


def test_checked_learned_positions_names_the_position():
  cfg = tiny(position="learned", max_len=16)
  model, p = init(cfg, tokens(0, 1, 4))
  pos = jnp.array([[0, 1, 2, 3], [15, 16, 17, 18]])
  with pytest.raises(ValueError, match=r"row 1: position 16 .*max_len=16"):
    lmjax.checked(model.apply)({"params": p}, tokens(1, 2, 4), positions=pos)
  s2s = tiny("seq2seq", position="learned", max_len=16)
  smodel, sp = init(s2s, tokens(0, 1, 4), tokens(1, 1, 4))
  with pytest.raises(ValueError, match=r"encoder row 1: position 16 .*max_len=16"):
    lmjax.checked(smodel.apply)({"params": sp}, tokens(2, 2, 4), tokens(3, 2, 3),
                                encoder_positions=pos)
