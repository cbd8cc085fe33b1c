"""Bradley-Terry, DPO and IPO against hand-derived float64 formulas, on packed pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from tests.lmjax.helpers import random_params, tiny
from train import preference_data as pd
from train import preference_losses as pl


class Fixed:
  """A stand-in model whose output is its params (values `[B, T]` or logits `[B, T, V]`)."""

  def apply(self, variables, *args, **kwargs):
    return variables["params"]


def _examples(lengths, margins, rng, vocab=11, shift=False):
  out = []
  for (nc, nr), m in zip(lengths, margins):
    n = nc + nr
    ex = {"inputs": rng.integers(1, vocab, n).astype(np.int32),
          "sign": np.r_[np.ones(nc), -np.ones(nr)].astype(np.float32),
          "last": np.zeros(n, np.float32), "margin": np.full(n, m, np.float32)}
    ex["last"][[nc - 1, n - 1]] = 1
    if shift:
      ex["targets"] = rng.integers(0, vocab, n).astype(np.int32)
      ex["loss_mask"] = (rng.random(n) < 0.7).astype(np.float32)
      ex["loss_mask"][[nc - 1, n - 1]] = 1
    out.append(ex)
  return out


def _packed(examples, rows, t):
  """Examples packed by hand: row r holds the examples listed in `rows[r]`."""
  out = []
  for idx in rows:
    row = {k: np.zeros(t, v.dtype) for k, v in examples[0].items()}
    row["inputs_segment_ids"] = np.zeros(t, np.int32)
    pos = 0
    for k, i in enumerate(idx, 1):
      n = len(examples[i]["inputs"])
      for key, v in examples[i].items():
        row[key][pos:pos + n] = v
      row["inputs_segment_ids"][pos:pos + n] = k
      pos += n
    out.append(pd.finalize(row))
  return {k: jnp.asarray(np.stack([r[k] for r in out])) for k in out[0]}


LENGTHS = [(3, 4), (2, 5), (4, 4)]
MARGINS = [0.0, 0.5, -0.25]
ROWS = [[0, 1], [2]]  # two pairs packed in row 0, one in row 1


def test_bradley_terry_loss_and_gradient_match_float64():
  rng = np.random.default_rng(0)
  ex = _examples(LENGTHS, MARGINS, rng)
  batch = _packed(ex, ROWS, 16)
  values = rng.standard_normal((2, 16)).astype(np.float32)
  (loss, (n, sums)), grad = jax.jit(jax.value_and_grad(
      lambda v: (lambda o: (o[0], (o[1], o[2])))(
          pl.bradley_terry_loss(Fixed(), v, batch, jax.random.key(0), False)),
      has_aux=True))(jnp.asarray(values))
  # Hand-derived: per pair, d = r_c - r_r - m; loss = log(1 + exp(-d)); dL/dr_c = -sigmoid(-d).
  v64 = values.astype(np.float64)
  # (row, chosen's last token, rejected's last token): row 0 packs [0,3)+[3,7) and
  # [7,9)+[9,14); row 1 holds [0,4)+[4,8).
  where = [(0, 2, 6), (0, 8, 13), (1, 3, 7)]
  want_loss, want_grad, margin_sum, correct = 0.0, np.zeros_like(v64), 0.0, 0
  for (row, c, r), m in zip(where, MARGINS):
    d = v64[row, c] - v64[row, r] - m
    want_loss += np.log1p(np.exp(-d))
    s = 1.0 / (1.0 + np.exp(d))
    want_grad[row, c] -= s
    want_grad[row, r] += s
    margin_sum += v64[row, c] - v64[row, r]
    correct += v64[row, c] > v64[row, r]
  assert float(n) == 3
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6)
  np.testing.assert_allclose(float(sums["margin"]), margin_sum, rtol=1e-5)
  assert float(sums["correct"]) == correct


def _log_softmax64(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                 ("ipo", 0.0)])
def test_dpo_loss_matches_float64_on_fixed_log_probs(loss_type, smoothing):
  rng = np.random.default_rng(1)
  ex = _examples(LENGTHS, [0.0] * 3, rng, shift=True)
  batch = _packed(ex, ROWS, 16)
  pol = rng.standard_normal((2, 16, 11)).astype(np.float32) * 2
  ref = rng.standard_normal((2, 16, 11)).astype(np.float32) * 2
  beta = 0.3
  loss_fn = pl.dpo_loss(beta=beta, loss_type=loss_type, label_smoothing=smoothing)
  loss, n, sums = jax.jit(lambda p: loss_fn(Fixed(), p, batch, jax.random.key(0), False))(
      {"policy": jnp.asarray(pol), "reference": jnp.asarray(ref)})
  tg = np.asarray(batch["targets"])
  mask = np.asarray(batch["loss_mask"]).astype(np.float64)
  lp_pol = np.take_along_axis(_log_softmax64(pol), tg[..., None], -1)[..., 0] * mask
  lp_ref = np.take_along_axis(_log_softmax64(ref), tg[..., None], -1)[..., 0] * mask
  spans = [(0, (0, 3), (3, 7)), (0, (7, 9), (9, 14)), (1, (0, 4), (4, 8))]
  want, chosen_reward = 0.0, 0.0
  for row, (c0, c1), (r0, r1) in spans:
    def total(lp, a, b, row=row):
      s = lp[row, a:b].sum()
      return s / mask[row, a:b].sum() if loss_type == "ipo" else s
    pc, pr = total(lp_pol, c0, c1), total(lp_pol, r0, r1)
    rc, rr = total(lp_ref, c0, c1), total(lp_ref, r0, r1)
    h = (pc - rc) - (pr - rr)
    if loss_type == "ipo":
      want += (h - 1 / (2 * beta)) ** 2
    else:
      want += (-(1 - smoothing) * np.log(1 / (1 + np.exp(-beta * h)))
               - smoothing * np.log(1 / (1 + np.exp(beta * h))))
    chosen_reward += beta * (pc - rc)
  assert float(n) == 3
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(sums["chosen"]), chosen_reward, rtol=2e-5, atol=1e-6)


def test_dpo_at_the_reference_is_log_2_and_pushes_toward_chosen():
  cfg = tiny(num_decoder_layers=1)
  model = lmjax.CausalLM(cfg)
  params = random_params(model, (jnp.ones((1, 8), jnp.int32),), 0)
  rng = np.random.default_rng(2)
  ex = _examples(LENGTHS, [0.0] * 3, rng, vocab=cfg.vocab_size, shift=True)
  batch = _packed(ex, ROWS, 16)

  loss_fn = pl.dpo_loss(beta=0.1)

  @jax.jit
  def loss_and_grad(policy, reference):
    def mean_loss(p):
      out = loss_fn(model, {"policy": p, "reference": reference}, batch, jax.random.key(0),
                    False)
      return out[0] / out[1], out[2]
    return jax.value_and_grad(mean_loss, has_aux=True)(policy)

  (value, sums), grad = loss_and_grad(params, params)
  assert abs(float(value) - np.log(2.0)) < 1e-6
  assert float(sums["margin"]) == 0.0
  grad = jax.tree.map(np.asarray, grad)  # numpy from here: no op-by-op compilations
  assert sum(float(np.sum(g ** 2)) for g in jax.tree.leaves(grad)) > 0
  stepped = jax.tree.map(lambda p, g: np.asarray(p) - 0.5 * g, params, grad)
  (_, after), _ = loss_and_grad(stepped, params)
  assert float(after["chosen"]) > 0 > float(after["rejected"])  # chosen up, rejected down


def test_swapping_chosen_and_rejected_flips_the_margin():
  cfg = tiny()
  model = lmjax.RewardModel(cfg)
  params = random_params(model, (jnp.ones((1, 8), jnp.int32),), 0)
  rng = np.random.default_rng(3)
  ex = _examples(LENGTHS, [0.0] * 3, rng, vocab=cfg.vocab_size)
  swapped = []
  for e, (nc, _) in zip(ex, LENGTHS):
    s = {k: np.r_[v[nc:], v[:nc]] for k, v in e.items()}
    s["sign"] = -s["sign"]
    swapped.append(s)
  loss = jax.jit(lambda b: pl.bradley_terry_loss(model, params, b, jax.random.key(0), False))
  out = [loss(_packed(e, ROWS, 16)) for e in (ex, swapped)]
  assert abs(float(out[0][2]["margin"])) > 1e-4
  np.testing.assert_allclose(float(out[1][2]["margin"]), -float(out[0][2]["margin"]), rtol=1e-5)
  np.testing.assert_allclose(float(out[1][2]["chosen"]), float(out[0][2]["rejected"]),
                             rtol=1e-5)


def test_bad_loss_settings_fail():
  with pytest.raises(ValueError, match="loss_type"):
    pl.dpo_loss(beta=0.1, loss_type="hinge2")
  with pytest.raises(ValueError, match="beta"):
    pl.dpo_loss(beta=0.0)
