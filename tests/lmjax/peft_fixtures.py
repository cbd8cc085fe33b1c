"""Shared pieces of the PEFT tests: one tiny base per process, its jitted forwards, random
"trained" adapters, and a no-cache greedy decoder (the reference for `infer.generate`)."""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lmjax
from lmjax import peft
from tests.lmjax.helpers import random_params, tiny, tokens


@dataclasses.dataclass(frozen=True)
class Base:
  cfg: lmjax.TransformerConfig
  model: object
  params: dict
  x: jax.Array  # [3, 7] tokens
  fwd: Callable  # jitted (params, tokens) -> logits of the plain model
  pfwd: Callable  # jitted (Adapted, tokens) -> logits through lmjax.peft.apply


@functools.cache
def tiny_base(scan: bool = False) -> Base:
  cfg = tiny(scan_layers=scan)
  x = tokens(0, 3, 7)
  model = lmjax.model_for(cfg)
  params = random_params(model, (x,), 1)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
  pfwd = jax.jit(lambda a, t: peft.apply(model, a, t))
  return Base(cfg, model, params, x, fwd, pfwd)


def random_adapter(spec, cfg, seed, std=0.3):
  """An adapter whose every leaf is random (B too: a trained one), so it changes the output."""
  ad = nn.meta.unbox(peft.init(spec, cfg, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * std, jnp.float32), ad)


def greedy(fwd, params, prompts, n, width=16):
  """Greedy continuations by recomputing the whole prefix each step (no KV cache): row i runs
  `fwd(params, tokens)` on a fixed `[B, width]` buffer (causal: padding after a row's end does
  not change its logits), so one compiled forward serves every step."""
  buf = np.zeros((len(prompts), width), np.int32)
  lens = [len(p) for p in prompts]
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  out = [[] for _ in prompts]
  for _ in range(n):
    logits = np.asarray(fwd(params, jnp.asarray(buf)))
    for i in range(len(prompts)):
      tok = int(np.argmax(logits[i, lens[i] - 1]))
      out[i].append(tok)
      buf[i, lens[i]] = tok
      lens[i] += 1
  return out
