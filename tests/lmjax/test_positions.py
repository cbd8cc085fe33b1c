"""Positions: sinusoidal encodings equal the formula of Vaswani et al. (2017, section 3.5),
computed in float64; sinusoidal and learned positions are what the first block receives, and
learned positions are looked up by position (changing row j changes outputs from position j on)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.embeddings import sinusoidal
from lmjax.transformer import Block
from tests.lmjax.helpers import init, tiny, tokens


def paper_encoding(positions: np.ndarray, d: int) -> np.ndarray:
  """Section 3.5 in float64: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
  pos = np.asarray(positions, np.float64)[..., None]
  two_i = np.arange(0, d, 2, dtype=np.float64)
  angles = pos / 10000.0 ** (two_i / d)
  pe = np.zeros(pos.shape[:-1] + (d,), np.float64)
  pe[..., 0::2] = np.sin(angles)
  pe[..., 1::2] = np.cos(angles)
  return pe


def as_halves(pe: np.ndarray) -> np.ndarray:
  """The paper's dims in lmjax's layout (that of tensor2tensor and Marian): the d/2 sines
  PE(pos, 2i) first, then the d/2 cosines PE(pos, 2i+1): a fixed permutation of the dims."""
  return np.concatenate([pe[..., 0::2], pe[..., 1::2]], axis=-1)


@pytest.mark.parametrize("d", [8, 32, 64, 512])
def test_sinusoidal_equals_the_formula_in_float64(d):
  positions = np.stack([np.arange(512), np.arange(512)[::-1]])  # [B=2, T=512], up to 511
  got = np.asarray(sinusoidal(jnp.asarray(positions, jnp.int32), d), np.float64)
  want = as_halves(paper_encoding(positions, d))
  assert got.shape == (2, 512, d)
  # float32 angles of positions < 512 are good to ~3e-5 rad.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # Each pair of dims (i, i + d/2) is one rotation: sin^2 + cos^2 = 1 at every position.
  np.testing.assert_allclose(got[..., : d // 2] ** 2 + got[..., d // 2:] ** 2, 1.0, atol=1e-5)


def _first_block_input(model, params, *args, **kwargs):
  """The `[B, T, D]` input of the first transformer block the call runs (embeddings plus
  positions), and the call's output."""
  seen = []

  def grab(next_fun, a, kw, context):
    if isinstance(context.module, Block) and context.method_name == "__call__" and not seen:
      seen.append(a[0])
    return next_fun(*a, **kw)

  with nn.intercept_methods(grab):
    out = model.apply({"params": params}, *args, **kwargs)
  return np.asarray(seen[0]), np.asarray(out)


def _embeddings(cfg, params, ids):
  x = np.asarray(params["embed"]["embedding"])[np.asarray(ids)]
  return x * np.sqrt(cfg.model_dim) if cfg.scale_embeddings else x


@pytest.mark.parametrize("offset", [0, 37])
def test_the_first_block_gets_embeddings_plus_sinusoids(offset):
  cfg = tiny("causal", position="sinusoidal", scale_embeddings=True)
  x = tokens(1, 2, 12)
  model, p = init(cfg, x)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32) + offset, x.shape)
  got, _ = _first_block_input(model, p, x, positions=pos)
  want = _embeddings(cfg, p, x) + as_halves(paper_encoding(np.asarray(pos), cfg.model_dim))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_the_first_block_gets_embeddings_plus_learned_rows():
  """Rows are read by position value: a shuffled `positions` reads the shuffled rows."""
  cfg = tiny("masked")  # learned positions, embed_norm off below so the sum is visible
  cfg = cfg.replace(embed_norm=False)
  x = tokens(2, 2, 10)
  model, p = init(cfg, x)
  pos = jnp.asarray(np.stack([np.random.default_rng(0).permutation(10) + 5, np.arange(10)]),
                    jnp.int32)
  got, _ = _first_block_input(model, p, x, positions=pos)
  table = np.asarray(p["encoder"]["positions"]["embedding"])
  assert table.shape == (cfg.max_len, cfg.model_dim)
  np.testing.assert_allclose(got, _embeddings(cfg, p, x) + table[np.asarray(pos)], rtol=1e-6,
                             atol=1e-6)


def test_learned_row_j_is_used_at_position_j():
  """In a causal model, changing the table's row j changes the logits at positions j and
  later and none before (a table that is not used, or not indexed by position, fails)."""
  cfg = tiny("causal", position="learned")
  x = tokens(3, 2, 12)
  model, p = init(cfg, x)
  run = jax.jit(lambda params: model.apply({"params": params}, x))
  base = np.asarray(run(p))
  for j in (0, 5, 11):
    table = p["decoder"]["positions"]["embedding"]
    changed = jax.tree.map(lambda a: a, p)
    changed["decoder"]["positions"]["embedding"] = table.at[j].add(0.5)
    out = np.asarray(run(changed))
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    assert np.all(np.max(np.abs(out[:, j:] - base[:, j:]), axis=(0, 2)) > 1e-4), j


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_an_encoder_sees_token_order_only_through_positions(position):
  """With no positions a bidirectional encoder is permutation-equivariant (a permuted input
  gives the permuted outputs); learned or sinusoidal positions break that, so they are used."""
  cfg = tiny("masked", position=position)
  x = tokens(4, 2, 10)
  model, p = init(cfg, x)
  perm = np.random.default_rng(1).permutation(10)
  run = jax.jit(lambda ids: model.apply({"params": p}, ids))
  base, permuted = np.asarray(run(x)), np.asarray(run(x[:, perm]))
  if position == "none":
    np.testing.assert_allclose(permuted, base[:, perm], rtol=1e-5, atol=1e-5)
  else:
    assert not np.allclose(permuted, base[:, perm], rtol=1e-3, atol=1e-3)
