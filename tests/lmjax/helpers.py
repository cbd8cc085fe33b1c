"""Small configs and init helpers shared by the core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lmjax

DECODER = dict(vocab_size=97, model_dim=32, num_heads=4, num_kv_heads=2, ffn_dim=64,
               num_decoder_layers=2, max_len=64)


def tiny(family: str = "causal", **overrides) -> lmjax.TransformerConfig:
  """A tiny config of one family: "causal", "masked" or "seq2seq"."""
  base = dict(DECODER)
  if family == "masked":
    base.update(num_encoder_layers=2, num_decoder_layers=0, norm_placement="post",
                activation="gelu", norm="layernorm", position="learned", embed_norm=True)
  elif family == "seq2seq":
    base.update(num_encoder_layers=2, num_decoder_layers=2, activation="relu",
                position="sinusoidal", norm_placement="post", scale_embeddings=True)
  else:
    base.update(activation="swiglu", norm="rmsnorm", position="rotary", use_bias=False)
  base.update(overrides)
  return lmjax.TransformerConfig(**base)


def init(cfg: lmjax.TransformerConfig, *inputs, seed: int = 0):
  model = lmjax.model_for(cfg)
  # Under jit: one compile, not one per initializer (eager ops compile one by one: a test of
  # test_model.py that inits two tiny models went from 12.4 to 8.8 s).
  params = jax.jit(lambda key, *x: nn.meta.unbox(model.init(key, *x)["params"]))(
      jax.random.key(seed), *inputs)
  return model, params


def tokens(key, b: int, t: int, vocab: int = 97):
  return jax.random.randint(jax.random.key(key), (b, t), 1, vocab, jnp.int32)


def random_params(model, inputs, seed):
  """Unit-scale random params (numpy, no compile), so a tiny model's greedy output varies."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *inputs)["params"]))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if leaf.ndim > 1:
      return jnp.asarray(x / np.sqrt(leaf.shape[0]))
    return jnp.asarray(1.0 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else 0.1 * x)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def find_eqns(jaxpr, names, *, descend_into_found: bool = True) -> list:
  """The equations of a jaxpr whose primitive is in `names`, nested jaxprs (scan, remat,
  shard_map, custom_vjp, ...) included."""
  found = []
  for eqn in jaxpr.eqns:
    hit = eqn.primitive.name in names
    if hit:
      found.append(eqn)
      if not descend_into_found:
        continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jax.extend.core.Jaxpr):
          found += find_eqns(sub, names, descend_into_found=descend_into_found)
  return found
