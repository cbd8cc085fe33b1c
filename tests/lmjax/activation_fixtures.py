"""References for int8 activations: a model run on float (dequantized) weights with each
projection's input rounded to int8 as the packed readers state it, in jnp on the model's own
path (`nn.intercept_methods`), so a test compares the packed readers with the model itself."""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import packed
from lmjax.layers import project_split


def fake_quant(x, k, group=None):
  """`x [..., inputs]` (the last `k` dims are inputs) rounded to int8 and scaled back: per row
  (`group` None: absmax / 127 over all inputs, clipped to +-127) or per `group` inputs."""
  flat = x.reshape(-1, math.prod(x.shape[x.ndim - k:]))
  g = flat.reshape(len(flat), -1, group or flat.shape[-1])
  s = jnp.max(jnp.abs(g), axis=-1, keepdims=True) / 127
  s = jnp.where(s > 0, s, 1.0)
  return (jnp.clip(jnp.round(g / s), -127, 127) * s).reshape(x.shape)


def rounded_apply(model, weights, t, group=None, rounds: Callable[[nn.Module], bool] = None,
                  head=True):
  """`model.apply({"params": weights}, t)` with each projection's input `fake_quant`-ed (per row
  or per `group`), jitted: every `Einsum` for which `rounds(module)` holds (all when None), and
  the output projection (tied or not) when `head`."""
  def quantize_input(next_fun, args, kwargs, context):
    m, role = context.module, packed.module_role(context.module, context.method_name)
    if role == "einsum" and (rounds is None or rounds(m)):
      args = (fake_quant(args[0], project_split(m.eqn), group),) + args[1:]
    elif head and (role == "head" or (role == "embedding" and context.method_name == "attend")):
      args = (fake_quant(args[0], 1, group),) + args[1:]
    return next_fun(*args, **kwargs)

  def apply(w, t):
    with nn.intercept_methods(quantize_input):
      return model.apply({"params": w}, t)
  return np.asarray(jax.jit(apply)(weights, t))
